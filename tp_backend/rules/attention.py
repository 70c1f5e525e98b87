"""Rules for the leaf ops kept whole by the decomposition: scaled dot-product attention and
cross-entropy (see :mod:`tp_backend.leaf_ops`).

Attention is independent per (batch, head): ``q: [B, H, S, D]``, ``k, v: [B, Hkv, S, D]``
may all be split on the heads dim 1 (or the batch dim 0); a replicated operand is sliced
locally, the mask split along heads only if it has a heads dim of size > 1. With grouped
query attention each rank keeps ``H / N`` query heads and ``Hkv / N`` KV heads, so the
head-to-group mapping is preserved when ``Hkv`` is divisible by ``N``. Query heads split
unevenly (``Shard(1, units=H)``, 9 heads -> 5 + 4) take the keys and values sliced to the
same heads (after ``repeat_kv``), or, with ``enable_gqa``, the KV heads they use.
"""

from __future__ import annotations

import torch

from ..placement import REPLICATE, HeadGroup, Shard
from . import Decision, divisible, register, static_int


def _sdpa(ctx, node):
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    qkv = [q, k, v]
    pls = [ctx.placement(t) for t in qkv]
    if any(p.is_partial() for p in pls):
        return None
    shards = {p for p in pls if p.is_shard()}
    if not shards:
        if isinstance(mask, torch.fx.Node) and not ctx.placement(mask).is_replicate():
            return None
        return Decision(out=REPLICATE)
    if pls[0].is_shard():
        s = pls[0]  # the query heads' split decides; keys/values follow it
    elif len(shards) > 1:
        return None
    else:
        s, = shards
    if s.dim not in (0, 1):
        return None
    n = ctx.tp_size
    sizes = [static_int(ctx.shape(t)[s.dim]) for t in qkv]
    if sizes[0] is not None and len(set(sizes)) == 1 and s.splits(sizes[0], n):
        # Every (batch, head) is independent, so q, k and v split alike in any layout
        # (strided: JetMoE's heads, expert-major after k.repeat(1, top_k, 1, 1)).
        need = {t: s for t in qkv}
    elif not s.plain and s.units is None:
        return None
    elif s.units is None and all(divisible(d, n) for d in sizes):
        need = {t: s for t in qkv}
    else:
        # Grouped-query attention whose KV heads do not split with the query heads (fewer
        # KV heads than ranks, or query heads split unevenly): keep q split and give each
        # rank the KV heads its query heads use (KV-head replication, as vLLM does).
        enable_gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
        hq, hkv = sizes[0], sizes[1]
        if not (s.dim == 1 and s.outer == 1 and s.blocks is None and enable_gqa
                and pls[0].is_shard() and hq and hkv
                and hq % hkv == 0 and s.splits(hq, n)):
            return None
        need = {q: s, k: HeadGroup(1, hq, hkv, s.units), v: HeadGroup(1, hq, hkv, s.units)}
    if isinstance(mask, torch.fx.Node):
        # The mask / additive bias (e.g. T5's relative position bias, per head) follows the
        # heads split if it has a heads dim; a partial sum is all-reduced first.
        pm = ctx.placement(mask)
        mshape = ctx.shape(mask)
        k_dim = s.dim - (4 - len(mshape))
        if k_dim >= 0 and static_int(mshape[k_dim]) != 1:
            need[mask] = s.moved(k_dim)
        elif pm.is_partial():
            need[mask] = REPLICATE
        elif not pm.is_replicate():
            return None
    return Decision(out=s, inputs=need)


def _cross_entropy(ctx, node):
    # A vocab-parallel cross-entropy is future work: gather the logits whole (an all-gather
    # of the LM head output) rather than replicate the LM head.
    ins = {a: REPLICATE for a in node.all_input_nodes}
    return Decision(out=REPLICATE, inputs=ins, allow_gather=True)


def register_leaf_rules(sdpa_op, ce_op):
    register(sdpa_op)(_sdpa)
    register(ce_op)(_cross_entropy)
