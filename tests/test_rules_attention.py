"""Leaf-op rules: attention split over heads (with GQA and masks) and cross-entropy."""

import torch

import tp_backend.leaf_ops  # noqa: F401 - registers the leaf ops and their rules
from rule_harness import check
from tp_backend.placement import REPLICATE, Shard

R = REPLICATE
sdpa = torch.ops.tp_backend.sdpa


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_heads_sharded_causal():
    q, k, v = r(2, 4, 5, 3), r(2, 4, 5, 3), r(2, 4, 5, 3)
    check(lambda q, k, v: sdpa(q, k, v, is_causal=True), [q, k, v], [Shard(1)] * 3,
          expect=Shard(1))


def test_replicated_kv_sliced_and_gqa():
    # 4 query heads, 2 KV heads, TP=2: each rank keeps 2 query heads and their KV head.
    q, k, v = r(2, 4, 5, 3), r(2, 2, 5, 3), r(2, 2, 5, 3)
    check(lambda q, k, v: sdpa(q, k, v, enable_gqa=True), [q, k, v], [Shard(1), R, R],
          expect=Shard(1))


def test_mask_with_heads_dim_is_sliced():
    q, k, v = r(2, 4, 5, 3), r(2, 4, 5, 3), r(2, 4, 5, 3)
    mask = r(2, 4, 5, 5)
    check(lambda q, k, v, m: sdpa(q, k, v, m), [q, k, v, mask], [Shard(1)] * 3 + [R],
          expect=Shard(1))
    mask1 = r(2, 1, 5, 5)
    check(lambda q, k, v, m: sdpa(q, k, v, m), [q, k, v, mask1], [Shard(1)] * 3 + [R],
          expect=Shard(1))


def test_sharded_head_dim_refused():
    q, k, v = r(2, 4, 5, 4), r(2, 4, 5, 4), r(2, 4, 5, 4)
    assert check(lambda q, k, v: sdpa(q, k, v), [q, k, v], [Shard(3)] * 3) is None


def test_cross_entropy_wants_whole_logits():
    ce = torch.ops.tp_backend.cross_entropy
    logits, target = r(6, 8), torch.tensor([1, 2, 3, 0, 7, 5])
    dec = check(lambda x, t: ce(x, t), [logits, target], [Shard(1), R], expect=R)
    assert dec.allow_gather
