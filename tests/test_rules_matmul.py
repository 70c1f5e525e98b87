"""Matmul rules: column-parallel seeds on parameters, row-parallel Partial outputs, the bias
of a row-parallel addmm added once, and batch shards of bmm."""

import torch

from rule_harness import check
from tp_backend.placement import PARTIAL, REPLICATE, Shard

aten = torch.ops.aten
R, P = REPLICATE, PARTIAL


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_column_parallel_seed_on_parameter():
    # x @ W.t() with W: [out, in]; b = W.t(): [in, out] is split on out (dim 1).
    dec = check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 6)], [R, R], params=[1],
                expect=Shard(1))
    assert dec.seed == "column" and list(dec.roles.values()) == ["column"]


def test_no_seed_for_activations_or_when_vetoed():
    check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 6)], [R, R], expect=R)
    check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 6)], [R, R], params=[1],
          seeds_allowed=False, expect=R)


def test_uneven_seed_when_out_features_do_not_divide():
    """7 features at TP=2 split 4 + 3 (issue 15: uneven splits), checked rank by rank."""
    dec = check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 7)], [R, R], params=[1],
                expect=Shard(1, units=7))
    assert dec.seed == "column"
    check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 2)], [R, R], params=[1], tp_size=3,
          expect=R)  # fewer features than ranks: whole


def test_seed_in_whole_heads_when_asked():
    """A consumer that views the features as 3 heads of 4 asks for whole heads: at TP=2
    the heads go 2 + 1 (8 + 4 features); at TP=3 one head each, the plain split."""
    check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 12)], [R, R], params=[1], units=3,
          expect=Shard(1, units=3))
    check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 12)], [R, R], params=[1], units=3,
          tp_size=3, expect=Shard(1))


def test_row_parallel_of_an_uneven_split_gives_partial():
    check(lambda x, b: aten.mm(x, b), [r(5, 9), r(9, 6)], [Shard(1, units=3), R], params=[1],
          expect=P)


def test_row_parallel_gives_partial():
    dec = check(lambda x, b: aten.mm(x, b), [r(5, 8), r(8, 6)], [Shard(1), R], params=[1],
                expect=P)
    assert list(dec.roles.values()) == ["row"]


def test_row_sharded_rows_stay_sharded():
    check(lambda x, b: aten.mm(x, b), [r(6, 8), r(8, 5)], [Shard(0), R], expect=Shard(0))


def test_partial_times_replicated():
    check(lambda x, b: aten.mm(x, b), [r(6, 8), r(8, 5)], [P, R], expect=P)


def test_column_addmm_shards_bias():
    dec = check(lambda bias, x, b: aten.addmm(bias, x, b), [r(6), r(5, 8), r(8, 6)], [R, R, R],
                params=[0, 2], expect=Shard(1))
    assert dec.seed == "column"


def test_row_addmm_adds_bias_once():
    # The product is a partial sum; the decision must all-reduce before adding the bias.
    dec = check(lambda bias, x, b: aten.addmm(bias, x, b), [r(6), r(5, 8), r(8, 6)],
                [R, Shard(1), R], params=[0, 2], expect=None)
    assert dec.action == "row_addmm" and dec.out == R


def test_bmm_heads_and_contraction():
    check(lambda a, b: aten.bmm(a, b), [r(4, 3, 5), r(4, 5, 2)], [Shard(0), R], expect=Shard(0))
    check(lambda a, b: aten.bmm(a, b), [r(4, 3, 6), r(4, 6, 2)], [Shard(2), R], expect=P)


def test_triangular_solve_keeps_batch_and_column_shards():
    """linalg_solve_triangular(A, B): each batch entry and each column of B (row, with
    left=False) is solved alone, so those shards stay; splitting n couples the ranks."""
    a = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(0)).tril() \
        + 6 * torch.eye(6)
    b = torch.randn(4, 6, 4, generator=torch.Generator().manual_seed(1))
    solve = torch.ops.aten.linalg_solve_triangular
    check(lambda x, y: solve(x, y, upper=False), [a, b], [Shard(0), Shard(0)], expect=Shard(0))
    check(lambda x, y: solve(x, y, upper=False), [a, b], [Shard(0), REPLICATE],
          expect=Shard(0))  # B is sliced to A's batch entries
    check(lambda x, y: solve(x, y, upper=False), [a, b], [REPLICATE, Shard(2)],
          expect=Shard(2))
    check(lambda x, y: solve(x, y, upper=False, left=False), [a, b.transpose(1, 2)],
          [REPLICATE, Shard(1)], expect=Shard(1))
    check(lambda x, y: solve(x, y, upper=False), [a[0], b], [REPLICATE, Shard(0)],
          expect=Shard(0))  # A broadcast over the batch
    check(lambda x, y: solve(x, y, upper=False), [a, b], [REPLICATE, PARTIAL], expect=PARTIAL)
    assert check(lambda x, y: solve(x, y, upper=False), [a, b], [Shard(1), REPLICATE]) is None
    assert check(lambda x, y: solve(x, y, upper=False), [a, b], [REPLICATE, Shard(1)]) is None
    assert check(lambda x, y: solve(x, y, upper=False), [a, b], [PARTIAL, REPLICATE]) is None
