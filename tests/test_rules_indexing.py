"""Indexing rules: slice/select/cat/split on other dims, refusal on the sharded dim,
vocab-parallel embedding, gather and advanced indexing."""

import pytest
import torch

from rule_harness import check
from tp_backend.placement import PARTIAL, REPLICATE, Shard

aten = torch.ops.aten
R, P = REPLICATE, PARTIAL


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_slice_other_dim_and_full_slice():
    check(lambda x: aten.slice(x, 2, 0, 3), [r(2, 4, 6)], [Shard(1)], expect=Shard(1))
    check(lambda x: aten.slice(x, 1, 0, 9223372036854775807), [r(2, 4, 6)], [Shard(1)],
          expect=Shard(1))
    assert check(lambda x: aten.slice(x, 1, 0, 2), [r(2, 4, 6)], [Shard(1)]) is None


def test_strided_slice_of_the_sharded_dim():
    """x[..., s::k] (gpt-oss's interleaved gate/up): exact when each rank's chunk of each
    block is a multiple of k long; refused otherwise (the harness simulates the ranks)."""
    from tp_backend.placement import Shard as S

    x = r(3, 16)
    check(lambda t: aten.slice(t, 1, 0, 9223372036854775807, 2), [x], [S(1)], expect=S(1))
    check(lambda t: aten.slice(t, 1, 1, 9223372036854775807, 2), [x], [S(1)], expect=S(1))
    check(lambda t: aten.slice(t, 1, 1, 16, 2), [x], [S(1)], tp_size=4, expect=S(1))
    check(lambda t: aten.slice(t, 1, 1, 9223372036854775807, 2), [x], [S(1, outer=2)],
          expect=S(1, outer=2))
    check(lambda t: aten.slice(t, 1, 0, 9223372036854775807, 2), [r(3, 24)],
          [S(1, blocks=(8, 16))], expect=S(1, blocks=(4, 8)))
    # chunks of 2 (TP=8) or 5 (16 of 10 features... here 10 / 2) are not multiples of 4 / 2
    assert check(lambda t: aten.slice(t, 1, 0, 9223372036854775807, 4), [x], [S(1)],
                 tp_size=8) is None
    assert check(lambda t: aten.slice(t, 1, 1, 9223372036854775807, 2), [r(3, 10)],
                 [S(1)]) is None
    # start past the step, or an end short of the dim: not one chunk per rank
    assert check(lambda t: aten.slice(t, 1, 2, 9223372036854775807, 2), [x], [S(1)]) is None
    assert check(lambda t: aten.slice(t, 1, 0, 12, 2), [x], [S(1)]) is None


def test_select_renumbers():
    check(lambda x: aten.select(x, 0, 1), [r(2, 4, 6)], [Shard(2)], expect=Shard(1))


def test_cat_on_other_dim_slices_replicated_operands():
    # rotate_half: cat((-x2, x1), dim=-1) of head-sharded halves.
    check(lambda a, b: aten.cat([a, b], -1), [r(2, 4, 3), r(2, 4, 3)], [Shard(1), R],
          expect=Shard(1))


def test_cat_on_the_sharded_dim_makes_blocks():
    """cat((q, k, v), -1) of column-parallel pieces (gated DeltaNet, before its depthwise
    convolution): each rank holds its chunk of every operand, a block shard; a replicated
    operand is sliced to its chunk; equal blocks are the strided shard."""
    check(lambda a, b: aten.cat([a, b], 1), [r(2, 4, 3), r(2, 4, 3)], [Shard(1), Shard(1)],
          expect=Shard(1, outer=2))
    check(lambda a, b, c: aten.cat([a, b, c], -1), [r(2, 4), r(2, 4), r(2, 8)],
          [Shard(1), Shard(1), R], expect=Shard(1, blocks=(4, 4, 8)))
    check(lambda a, b: aten.cat([a, b], 1), [r(2, 6), r(2, 8)],
          [Shard(1, blocks=(2, 4)), Shard(1)], expect=Shard(1, blocks=(2, 4, 8)))
    # an uneven split, a replicated operand N does not divide, a Partial one: refused
    assert check(lambda a, b: aten.cat([a, b], 1), [r(2, 9), r(2, 4)],
                 [Shard(1, units=9), Shard(1)]) is None
    assert check(lambda a, b: aten.cat([a, b], 1), [r(2, 4), r(2, 3)], [Shard(1), R]) is None
    assert check(lambda a, b: aten.cat([a, b], 1), [r(2, 4), r(2, 4)], [Shard(1), P]) is None


def test_split_into_runs_of_blocks():
    """Mamba-2 splits its projection [z | x B C | dt] (blocks z, x, B, C, dt) into three:
    the middle piece keeps its blocks; a cut inside a block is refused."""
    x = r(3, 26)
    dec = check(lambda t: aten.split_with_sizes(t, [8, 16, 2], 1), [x],
                [Shard(1, blocks=(8, 8, 4, 4, 2))])
    assert dec.out == (Shard(1), Shard(1, blocks=(8, 4, 4)), Shard(1)), dec.out
    assert dec.args[1] == [4, 8, 1], dec.args
    assert check(lambda t: aten.split_with_sizes(t, [10, 14, 2], 1), [x],
                 [Shard(1, blocks=(8, 8, 4, 4, 2))]) is None
    # a split size: pieces of two blocks each, the last one shorter
    dec = check(lambda t: aten.split(t, 12, 1), [r(3, 28)], [Shard(1, blocks=(8, 4, 8, 4, 4))])
    assert dec.out == (Shard(1, blocks=(8, 4)),) * 2 + (Shard(1),), dec.out


def test_constant_pad():
    """F.pad keeps a shard on a dim it does not pad (the chunked delta rule pads the
    sequence of head-sharded values); padding the sharded dim is refused; zero padding is
    linear (Partial stays Partial), other values are not."""
    x = r(2, 4, 6)
    check(lambda t: aten.constant_pad_nd(t, [0, 0, 1, 2]), [x], [Shard(0)], expect=Shard(0))
    check(lambda t: aten.constant_pad_nd(t, [1, 1]), [x], [Shard(1)], expect=Shard(1))
    assert check(lambda t: aten.constant_pad_nd(t, [0, 0, 1, 2]), [x], [Shard(1)]) is None
    check(lambda t: aten.constant_pad_nd(t, [1, 1]), [x], [P], expect=P)
    check(lambda t: aten.constant_pad_nd(t, [1, 1], 0.5), [x], [P], expect=R)


def test_split_other_dim():
    check(lambda x: aten.split_with_sizes(x, [2, 4], 2), [r(2, 4, 6)], [Shard(1)],
          expect=(Shard(1), Shard(1)))


def test_vocab_parallel_embedding_seed():
    ids = torch.tensor([[0, 5, 7], [3, 1, 6]])
    dec = check(lambda w, i: aten.embedding(w, i), [r(8, 4), ids], [R, R], params=[0],
                expect=None)
    assert dec.out == P and dec.action == "vocab_embedding" and dec.seed == "vocab"


def test_vocab_parallel_embedding_exact():
    # Simulate the layer itself: per rank masked lookups summed over ranks == the lookup.
    from tp_backend.layers import vocab_parallel_embedding

    w, ids = r(8, 4), torch.tensor([[0, 5, 7], [3, 1, 6]])
    parts = [vocab_parallel_embedding(w[k * 4:(k + 1) * 4], ids, k * 4, (k + 1) * 4) for k in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], torch.nn.functional.embedding(ids, w), rtol=0, atol=0)


@pytest.mark.parametrize("padding_idx", [0, 5])
def test_vocab_parallel_embedding_gradient_skips_the_padding_row(padding_idx):
    """The table's gradient, per rank's rows, equals F.embedding's with the same
    padding_idx (its row gets none): the padding row is the holding rank's local row, and
    another rank's local row of the same index still gets its gradient. Exact: the same
    additions."""
    from tp_backend.layers import vocab_parallel_embedding

    w, ids = r(8, 4), torch.tensor([[0, 5, 7, 4], [3, 1, 6, 5]])
    whole = w.clone().requires_grad_(True)
    torch.nn.functional.embedding(ids, whole, padding_idx=padding_idx).square().sum().backward()
    grads = []
    for k in range(2):
        shard = w[k * 4:(k + 1) * 4].clone().requires_grad_(True)
        out = vocab_parallel_embedding(shard, ids, k * 4, (k + 1) * 4, padding_idx)
        # d(sum of squares)/d(out) of the summed lookup is 2 * (the whole lookup)
        (out * 2 * torch.nn.functional.embedding(ids, w).detach()).sum().backward()
        grads.append(shard.grad)
    torch.testing.assert_close(torch.cat(grads), whole.grad, rtol=0, atol=0)


def test_embedding_scale_grad_by_freq_keeps_the_table_whole():
    ids = torch.tensor([[0, 5, 7], [3, 1, 6]])
    dec = check(lambda w, i: aten.embedding(w, i, -1, True), [r(8, 4), ids], [R, R],
                params=[0], expect=R)
    assert dec.action is None


def test_embedding_hidden_sharded_table():
    ids = torch.tensor([[0, 5, 7]])
    check(lambda w, i: aten.embedding(w, i), [r(8, 4), ids], [Shard(1), R], expect=Shard(2))


def test_index_with_unsharded_index_dims():
    idx = torch.tensor([2, 0, 1])
    check(lambda x, i: aten.index(x, [None, i]), [r(4, 3, 6), idx], [Shard(0), R],
          expect=Shard(0))
    assert check(lambda x, i: aten.index(x, [i]), [r(4, 3, 6), idx], [Shard(0), R]) is None


def test_gather_other_dim():
    idx = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 0]])
    check(lambda x, i: aten.gather(x, 1, i), [r(4, 3), idx], [Shard(0), R], expect=Shard(0))


def test_fused_projection_split_into_its_blocks():
    """Fused q|k|v (GQA: unequal blocks) and gate|up: a block shard splits into plain
    shards, with local split sizes; a plain shard refuses and asks for the blocks."""
    from tp_backend.placement import Shard as S

    x = r(3, 32)  # q: 16, k: 8, v: 8 features, TP=2
    dec = check(lambda t: aten.split_with_sizes(t, [16, 8, 8], 1), [x], [S(1, blocks=(16, 8, 8))],
                expect=(S(1), S(1), S(1)))
    assert dec.args[1] == [8, 4, 4]
    check(lambda t: aten.slice(t, 1, 16, 24), [x], [S(1, blocks=(16, 8, 8))], expect=S(1))
    check(lambda t: aten.split(t, 16, 1), [x], [S(1, outer=2)], expect=(S(1), S(1)))
    from rule_harness import StubCtx, trace
    from tp_backend.rules import lookup

    gm, node = trace(lambda t: aten.slice(t, 1, 16, 24), [x])
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    ctx = StubCtx({ph: S(1)}, 2)
    assert lookup(node.target)(ctx, node) is None and ctx.prefs == [16, 24]  # + 0, size


def test_column_seed_takes_preferred_blocks():
    from tp_backend.placement import Shard as S

    dec = check(lambda a, b: aten.mm(a, b), [r(3, 8), r(8, 32)], [R, R], params=[1],
                blocks=(16, 8, 8), expect=S(1, blocks=(16, 8, 8)))
    assert dec.seed == "column"


def test_index_put_accumulated_into_zeros_keeps_partial():
    """zeros.index_add(0, idx, y) (JetMoE's experts' rows put back in token order) is
    linear in y, so Partial rows give a Partial result; into any other tensor (which every
    rank would add once) or without accumulate (a write, not a sum) it is refused. The
    rule sees the zeros' factory node, which the harness cannot feed, so the ranks are
    simulated here: the sum over ranks of each rank's result must equal the whole op's."""
    from rule_harness import decide, trace

    idx = torch.tensor([0, 2, 2, 1, 0])
    y = r(5, 3)
    parts = [r(5, 4)[:, :3], None]
    parts[1] = y - parts[0]

    def scatter(base, v, i=idx, acc=True):
        return aten.index_put(base, [i], v, acc)

    gm, node = trace(lambda v, i: scatter(aten.zeros([4, 3]), v, i), [y, idx])
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dec, _ = decide(node, ph, [P, R])
    assert dec is not None and dec.out == P
    whole = scatter(torch.zeros(4, 3), y)
    torch.testing.assert_close(sum(scatter(torch.zeros(4, 3), t) for t in parts), whole)
    gm, node = trace(lambda b, v, i: scatter(b, v, i), [r(4, 3), y, idx])
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert decide(node, ph, [R, P, R])[0] is None
    gm, node = trace(lambda v, i: scatter(aten.zeros([4, 3]), v, i, False), [y, idx])
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert decide(node, ph, [P, R])[0] is None
