"""Leaf-op rules: attention split over heads (with GQA and masks) and cross-entropy."""

import pytest
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


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_uneven_query_heads(tp_size):
    """SmolLM2's shape (issue 15): 9 query heads, 3 KV heads. The query heads split unevenly
    (5 + 4 at TP=2); keys and values expanded by ``repeat_kv`` are sliced to the same heads,
    and with ``enable_gqa`` each rank takes the KV heads its query heads use (rank 1 of
    TP=2 holds query heads 5..8, which use KV heads 1, 2, 2, 2: repeated per query head)."""
    uneven = Shard(1, units=9)
    q, k9, v9 = r(2, 9, 5, 3), r(2, 9, 6, 3), r(2, 9, 6, 2)
    check(lambda q, k, v: sdpa(q, k, v, is_causal=True), [q, k9, v9], [uneven, R, R],
          tp_size=tp_size, expect=uneven)
    mask = r(2, 9, 5, 6)
    check(lambda q, k, v, m: sdpa(q, k, v, m), [q, k9, v9, mask], [uneven, R, R, R],
          tp_size=tp_size, expect=uneven)
    k3, v3 = r(2, 3, 5, 3), r(2, 3, 5, 3)
    check(lambda q, k, v: sdpa(q, k, v, enable_gqa=True), [q, k3, v3], [uneven, R, R],
          tp_size=tp_size, expect=uneven)
    # 12 query heads split evenly at TP=2 (6 + 6) over 3 KV heads: rank 0 needs KV heads
    # 0 and 1, rank 1 heads 1 and 2
    q12 = r(2, 12, 5, 3)
    check(lambda q, k, v: sdpa(q, k, v, enable_gqa=True), [q12, k3, v3], [Shard(1), R, R],
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


def test_cross_entropy_runs_vocab_parallel_on_class_split_logits():
    """Logits split on the class dim go to the vocab-parallel loss as they are; split on
    another dim (here the rows), they are gathered (the loss's numerics:
    test_vocab_loss.py)."""
    from tp_backend.rules import Action

    ce = torch.ops.tp_backend.cross_entropy
    logits, target = r(6, 8), torch.tensor([1, 2, 3, 0, 7, 5])
    dec = check(lambda x, t: ce(x, t), [logits, target], [Shard(1), R], expect=R)
    assert dec.action is Action.VOCAB_CROSS_ENTROPY and not dec.allow_gather
    dec = check(lambda x, t: ce(x, t), [logits, target], [Shard(0), R], expect=R)
    assert dec.action is None and dec.allow_gather
