"""Element-wise rules: broadcasting, local slicing of replicated operands, Partial algebra.
Each case is simulated rank by rank (rule_harness) and compared with the global op."""

import pytest
import torch

from rule_harness import check
from tp_backend.placement import PARTIAL, REPLICATE, Shard

aten = torch.ops.aten
R, P = REPLICATE, PARTIAL


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_shard_times_broadcast_replicated():
    # [B, S, E/N] * [E] -> the [E] operand is sliced locally; output keeps the shard.
    dec = check(lambda x, w: aten.mul(x, w), [r(2, 3, 8), r(8)], [Shard(2), R], expect=Shard(2))
    assert dec.inputs[list(dec.inputs)[0]] == Shard(0)


def test_shard_plus_size_one_dim_needs_no_slice():
    dec = check(lambda x, y: aten.add(x, y), [r(2, 4, 8), r(2, 4, 1)], [Shard(2), R], expect=Shard(2))
    assert dec.inputs == {}


def test_leading_broadcast_dims_align_from_the_right():
    check(lambda x, y: aten.mul(x, y), [r(4, 6), r(3, 4, 6)], [Shard(0), R], expect=Shard(1))


def test_two_shards_on_different_dims_refused():
    assert check(lambda x, y: aten.add(x, y), [r(4, 6), r(4, 6)], [Shard(0), Shard(1)]) is None


def test_partial_plus_partial_is_partial():
    check(lambda x, y: aten.add(x, y), [r(4, 6), r(4, 6)], [P, P], expect=P)


def test_partial_plus_replicated_is_reduced_first():
    # P + R would add R once per rank: the rule must ask for the all-reduce.
    dec = check(lambda x, y: aten.add(x, y), [r(4, 6), r(4, 6)], [P, R], expect=R)
    assert list(dec.inputs.values()) == [R]


def test_partial_plus_scalar_is_reduced_first():
    check(lambda x: aten.add(x, 1.0), [r(4, 6)], [P], expect=R)


def test_partial_times_replicated_stays_partial():
    check(lambda x, y: aten.mul(x, y), [r(4, 6), r(6)], [P, R], expect=P)
    check(lambda x: aten.div(x, 3.0), [r(4, 6)], [P], expect=P)


def test_nonlinear_of_partial_is_reduced():
    check(lambda x: aten.sigmoid(x), [r(4, 6)], [P], expect=R)
    check(lambda x, y: aten.mul(x, y), [r(4, 6), r(4, 6)], [P, P], expect=R)


def test_upcast_of_partial_stays_partial_downcast_does_not():
    x = r(4, 6).mul(4).round().to(torch.bfloat16)  # integer-valued: exact in bf16
    check(lambda t: aten._to_copy(t, dtype=torch.float32), [x], [P], expect=P)
    check(lambda t: aten._to_copy(t, dtype=torch.bfloat16), [r(4, 6)], [P], expect=R)


@pytest.mark.parametrize("op", [aten.sigmoid, aten.gelu, aten.rsqrt, aten.exp, aten.neg])
def test_unary_keeps_shard(op):
    x = r(2, 8).abs() + 0.5
    check(lambda t: op(t), [x], [Shard(1)], expect=Shard(1))


def test_where_with_broadcast_mask():
    mask = torch.rand(1, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    check(lambda m, x, y: aten.where(m, x, y), [mask, r(4, 8), r(4, 8)], [R, Shard(1), R],
          expect=Shard(1))
