"""Reduction and normalisation rules: shards on kept dims survive (renumbered without
keepdim), sums over the shard become Partial, other reductions over it are refused."""

import torch

from rule_harness import check
from tp_backend.placement import PARTIAL, REPLICATE, Shard

aten = torch.ops.aten
R, P = REPLICATE, PARTIAL


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_mean_over_other_dim_keeps_shard():
    check(lambda x: aten.mean(x, [-1], True), [r(2, 4, 6)], [Shard(1)], expect=Shard(1))
    check(lambda x: aten.mean(x, [0]), [r(2, 4, 6)], [Shard(1)], expect=Shard(0))


def test_sum_over_shard_is_partial():
    check(lambda x: aten.sum(x, [1]), [r(2, 4, 6)], [Shard(1)], expect=P)


def test_mean_or_max_over_shard_refused():
    assert check(lambda x: aten.mean(x, [1]), [r(2, 4, 6)], [Shard(1)]) is None
    assert check(lambda x: aten.amax(x, [1]), [r(2, 4, 6)], [Shard(1)]) is None


def test_linear_reductions_of_partial():
    check(lambda x: aten.sum(x, [1]), [r(2, 4, 6)], [P], expect=P)
    check(lambda x: aten.amax(x, [1]), [r(2, 4, 6)], [P], expect=R)


def test_softmax_along_other_dim():
    check(lambda x: aten._softmax(x, -1, False), [r(2, 4, 6)], [Shard(1)], expect=Shard(1))
    assert check(lambda x: aten._softmax(x, -1, False), [r(2, 4, 6)], [Shard(2)]) is None


def test_layer_norm_over_unsharded_dims():
    w, b = r(6), r(6)
    check(lambda x, w, b: aten.native_layer_norm(x, [6], w, b, 1e-5), [r(2, 4, 6), w, b],
          [Shard(1), R, R], expect=(Shard(1), Shard(1), Shard(1)))
    assert check(lambda x, w, b: aten.native_layer_norm(x, [6], w, b, 1e-5), [r(2, 4, 6), w, b],
                 [Shard(2), R, R]) is None
