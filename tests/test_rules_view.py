"""View/layout rules: splitting features into heads, merging them back, strided shards of
merged (batch, heads) dims, and the refusal (an ``Indivisible`` note) for heads that do not
split."""

import pytest
import torch

from rule_harness import check, decide, trace
from tp_backend.rules import Indivisible
from tp_backend.placement import PARTIAL, REPLICATE, Shard
from tp_backend.rules.view import map_view_shard

aten = torch.ops.aten


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


def test_split_features_into_heads():
    # [B, S, H*D] -> [B, S, H, D] with H=6 heads over 3 ranks: shard moves to the heads dim
    # and the view's head count is patched to 6 / 3.
    dec = check(lambda x: aten.view(x, [2, 5, 6, 4]), [r(2, 5, 24)], [Shard(2)], tp_size=3,
                expect=Shard(2))
    assert dec.args[1] == [2, 5, 2, 4]


def test_minus_one_is_left_alone():
    dec = check(lambda x: aten.view(x, [2, 5, -1, 4]), [r(2, 5, 24)], [Shard(2)], expect=Shard(2))
    assert dec.args[1] == [2, 5, -1, 4]


def test_merge_heads_back():
    dec = check(lambda x: aten.view(x, [2, 5, 24]), [r(2, 5, 6, 4)], [Shard(2)], expect=Shard(2))
    assert dec.args[1] == [2, 5, 12]


def test_merge_batch_and_heads_is_a_strided_shard():
    # [B, H, S, D] -> [B*H, S, D]: chunks of H inside each batch element.
    check(lambda x: aten.view(x, [8, 5, 3]), [r(2, 4, 5, 3)], [Shard(1)],
          expect=Shard(0, outer=2))
    # ... and back: [B*H, S, S] -> [B, H, S, S] returns a plain shard on the heads.
    check(lambda x: aten.view(x, [2, 4, 5, 5]), [r(8, 5, 5)], [Shard(0, outer=2)], expect=Shard(1))


def test_indivisible_heads_ask_the_seed_for_whole_heads():
    """9 heads over 2 ranks (issue 15): the view asks the seed to deal out whole heads
    (5 + 4) and refuses this round, unless the solver runs another round for the request
    (then it decides provisionally); only where no seed can be asked (several seeds, fewer
    heads than ranks) is it an ``Indivisible`` note (the pipeline warns, or raises
    TPDivisibilityError under fallback="raise")."""
    gm, node = trace(lambda x: aten.view(x, [2, 3, 9, 4]), [r(2, 3, 36)])
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ctxs = []
    dec, notes = decide(node, ph, [Shard(2)], ctx_out=ctxs)
    assert dec is None and ctxs[0].units_asked == 9
    assert not any(isinstance(n, Indivisible) for n in notes), notes
    dec, notes = decide(node, ph, [Shard(2)], units_ok=False)
    assert dec is None
    assert len(notes) == 1 and isinstance(notes[0], Indivisible), notes
    assert "9 groups" in notes[0] and "tp_size=2" in notes[0], notes
    # Where the solver says the request brings another round (``pending_units``), the view
    # decides provisionally as if its seed dealt whole heads (5 + 4).
    dec, notes = decide(node, ph, [Shard(2)], pending=9)
    assert dec is not None and dec.out == Shard(2, units=9), dec
    assert not notes, notes


@pytest.mark.parametrize("tp_size", [2, 4])
def test_uneven_heads_pass_through_views(tp_size):
    """Features dealt out in whole heads (9 heads: 5 + 4 at TP=2, 3 + 2 + 2 + 2 at TP=4)
    become a shard of the heads dim with each rank's own head count, and merge back."""
    dec = check(lambda x: aten.view(x, [2, 3, 9, 4]), [r(2, 3, 36)], [Shard(2, units=9)],
                tp_size=tp_size, expect=Shard(2, units=9))
    assert dec.args[1] == [2, 3, 5 if tp_size == 2 else 3, 4]  # rank 0's heads
    check(lambda x: aten.view(x, [2, 3, 36]), [r(2, 3, 9, 4)], [Shard(2, units=9)],
          tp_size=tp_size, expect=Shard(2, units=9))
    check(lambda x: aten.view(x, [18, 3, 4]), [r(2, 9, 3, 4)], [Shard(1, units=9)],
          tp_size=tp_size, expect=Shard(0, outer=2, units=9))
    # a split finer than the units (each head in 3 groups of 12) keeps whole heads
    check(lambda x: aten.view(x, [2, 3, 27, 12]), [r(2, 3, 324)], [Shard(2, units=9)],
          tp_size=tp_size, expect=Shard(2, units=9))
    # repeat_kv's expand of unevenly split KV heads
    check(lambda x: aten.expand(x, [2, 3, 2, 5, 4]), [r(2, 3, 1, 5, 4)], [Shard(1, units=3)],
          expect=Shard(1, units=3))


def test_uneven_heads_refuse_a_view_that_cuts_a_head():
    # 3 units (heads of 12) viewed as 2 groups of 18: a head would straddle two indices
    out, why = map_view_shard((2, 36), (2, 2, 18), Shard(1, units=3), 2)
    assert out is None and why == ("indivisible", 2, 2)


def test_inner_dim_shard_cannot_merge_with_outer():
    # Sharded on the inner factor of a merge with a non-trivial outer dim: no plain shard,
    # and the strided shard is found instead.
    assert map_view_shard((3, 4), (12,), Shard(1), 2) == (Shard(0, outer=3), None)
    out, why = map_view_shard((12,), (3, 4), Shard(0), 2)
    assert out is None and why == ("indivisible", 3, 2)


@pytest.mark.parametrize("p", [REPLICATE, PARTIAL])
def test_view_of_replicated_or_partial(p):
    check(lambda x: aten.view(x, [4, 6]), [r(2, 12)], [p], expect=p)


def test_permute_transpose_t_unsqueeze_squeeze():
    check(lambda x: aten.permute(x, [0, 2, 1, 3]), [r(2, 4, 6, 3)], [Shard(2)], expect=Shard(1))
    check(lambda x: aten.transpose(x, 1, 2), [r(2, 4, 6)], [Shard(1)], expect=Shard(2))
    check(lambda x: aten.t(x), [r(4, 6)], [Shard(1)], expect=Shard(0))
    check(lambda x: aten.unsqueeze(x, 1), [r(4, 6)], [Shard(1)], expect=Shard(2))
    check(lambda x: aten.squeeze(x, [1]), [r(4, 1, 6)], [Shard(2)], expect=Shard(1))


def test_expand_patches_the_sharded_size():
    # repeat_kv: [B, Hkv, 1, S, D] -> [B, Hkv, n_rep, S, D]
    dec = check(lambda x: aten.expand(x, [2, 4, 3, 5, 2]), [r(2, 4, 1, 5, 2)], [Shard(1)],
                expect=Shard(1))
    assert dec.args[1] == [2, 2, 3, 5, 2]


def test_symbolic_leading_dims():
    """Pins the dynamic-shape case: a symbolic sequence (and size-1 batch) before the
    sharded features must not block the shard (it did: 5 all-gathers per layer)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.empty(7, 3, 576), static_shapes=False)
    s0, s1 = x.shape[0], x.shape[1]
    assert isinstance(s0.node.expr, __import__("sympy").Symbol)
    # [S, E] -> [1, S, E]
    assert map_view_shard((s1, 576), (1, s1, 576), Shard(1), 3)[0] == Shard(2)
    # [B, S, E] -> [B*S, E] (before a linear) and back
    assert map_view_shard((s0, s1, 576), (s0 * s1, 576), Shard(2), 3)[0] == Shard(1)
    assert map_view_shard((s0 * s1, 576), (s0, s1, 9, 64), Shard(1), 3)[0] == Shard(2)
    # [B, H, S, D] -> [B*H, S, D] with symbolic B: a strided shard needs a static outer
    assert map_view_shard((s0, 8, s1, 4), (s0 * 8, s1, 4), Shard(1), 2)[0] is None
