"""Rules for the leaf ops kept whole by the decomposition: scaled dot-product attention and
cross-entropy (see :mod:`tp_backend.leaf_ops`).

Attention is independent per (batch, head): ``q: [B, H, S, D]``, ``k, v: [B, Hkv, S, D]``
may all be split on the heads dim 1 (or the batch dim 0); a replicated operand is sliced
locally, the mask split along heads only if it has a heads dim of size > 1. With grouped
query attention each rank keeps ``H / N`` query heads and ``Hkv / N`` KV heads, so the
head-to-group mapping is preserved when ``Hkv`` is divisible by ``N``. Query heads split
unevenly (``Shard(1, units=H)``, 9 heads -> 5 + 4) take the keys and values sliced to the
same heads (after ``repeat_kv``), or, with ``enable_gqa``, the KV heads they use. Query
heads dealt in whole KV groups (``Shard(1, units=Hkv)``: 9 heads in 3 groups -> 6 + 3)
beside keys and values dealt alike (3 KV heads -> 2 + 1) are exact as they are: each rank
holds the KV heads of exactly its query heads. The solver's work balance asks for that
deal (``ctx.group_kv``, through ``ctx.prefer_coarser_units``), so that each rank computes
and caches only its own KV heads.

Cross-entropy takes logits split evenly on the class dim as they are, by the
vocab-parallel loss (``Action.VOCAB_CROSS_ENTROPY``, :mod:`tp_backend.vocab_loss`), and
gathers any other split.

Owns: the rules of ``tp_backend::sdpa`` and ``tp_backend::cross_entropy`` (installed by
:func:`register_leaf_rules`, which :mod:`tp_backend.leaf_ops` calls) and
:func:`is_kv_cache`, which the solver asks. Must not: define the leaf ops
(:mod:`tp_backend.leaf_ops`), take the KV heads (:func:`tp_backend.layers.kv_head_slice`,
inserted by :mod:`tp_backend.rewrite` for a ``HeadGroup`` target), or rewrite arguments
(:mod:`tp_backend.local_args`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..placement import REPLICATE, HeadGroup, Shard
from . import Action, Decision, arg, divisible, register, static_int

aten = torch.ops.aten


def _sdpa(ctx, node):
    q, k, v = arg(node, "query"), arg(node, "key"), arg(node, "value")
    mask = arg(node, "attn_mask")
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
    if ctx.group_kv and s.dim == 1 and s.units is not None and pls[1] == pls[2] \
            and pls[1].is_shard(1) and pls[1] != s and pls[1].units is not None:
        # The keys and values are split in whole KV heads (before or after repeat_kv), the
        # queries more finely: ask the queries' seed for whole KV groups (next round). This
        # round decides as below (the keys regathered: a conflict the solver leaves alone
        # while preferences change), so the heads' split still reaches the output
        # projection and the layers after it are solved in the same round.
        ctx.prefer_coarser_units(q, pls[1].units)
    if sizes[0] is not None and len(set(sizes)) == 1 and s.splits(sizes[0], n):
        # Every (batch, head) is independent, so q, k and v split alike in any layout
        # (strided: JetMoE's heads, expert-major after k.repeat(1, top_k, 1, 1)).
        need = {t: s for t in qkv}
    elif not s.plain and s.units is None:
        return None
    elif s.units is None and all(divisible(d, n) for d in sizes):
        need = {t: s for t in qkv}
    elif _kv_groups_aligned(pls, sizes, s, n, arg(node, "enable_gqa")):
        need = {q: s, k: pls[1], v: pls[2]}
    else:
        # Grouped-query attention whose KV heads do not split with the query heads (fewer
        # KV heads than ranks, or query heads split unevenly): keep q split and give each
        # rank the KV heads its query heads use (KV-head replication, as vLLM does).
        enable_gqa = arg(node, "enable_gqa")
        hq, hkv = sizes[0], sizes[1]
        if not (s.dim == 1 and s.outer == 1 and s.blocks is None and s.counts is None
                and enable_gqa
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


def _kv_groups_aligned(pls, sizes, s, n, enable_gqa) -> bool:
    """Whether every rank's query heads (``s`` on dim 1, ``sizes[0]`` heads) are exactly
    the query heads of its KV heads (the keys' and values' split, ``sizes[1]`` heads), so
    that grouped-query attention runs on the local heads as it is."""
    pk, pv = pls[1], pls[2]
    hq, hkv = sizes[0], sizes[1]
    if not (enable_gqa and pk == pv and isinstance(pk, Shard) and pk.dim == 1 and s.dim == 1
            and pk.outer == 1 and pk.blocks is None and s.outer == 1 and s.blocks is None
            and hq and hkv and hq % hkv == 0 and s.splits(hq, n) and pk.splits(hkv, n)):
        return False
    g = hq // hkv
    return all(s.ranges(hq, r, n) == [(a * g, b * g) for a, b in pk.ranges(hkv, r, n)]
               for r in range(n))


def _cross_entropy(ctx, node):
    # Logits split evenly on the class dim (a vocab-parallel LM head) and class-index
    # targets without class weights: the vocab-parallel cross-entropy, on the split logits
    # (tp_backend.vocab_loss). Otherwise gather the logits whole (an all-gather of the LM
    # head output) rather than replicate the LM head.
    x, target, weight = arg(node, "input", "self"), arg(node, "target"), arg(node, "weight")
    p = ctx.placement(x)
    tval = target.meta.get("val") if isinstance(target, fx.Node) else None
    if (p is not None and p.is_shard() and p.dim == 1 and p.plain and weight is None
            and len(ctx.shape(x)) >= 2 and isinstance(tval, torch.Tensor)
            and not tval.is_floating_point()):
        ins = {a: REPLICATE for a in node.all_input_nodes if a is not x}
        return Decision(out=REPLICATE, inputs={**ins, x: p},
                        action=Action.VOCAB_CROSS_ENTROPY)
    ins = {a: REPLICATE for a in node.all_input_nodes}
    return Decision(out=REPLICATE, inputs=ins, allow_gather=True)


def register_leaf_rules(sdpa_op, ce_op):
    register(sdpa_op)(_sdpa)
    register(ce_op)(_cross_entropy)


# --- Which graph outputs are key/value caches -------------------------------------------
# The solver returns an output split (each rank keeps its heads' part for the next step)
# only when it is a key/value cache: a value that feeds attention as keys or values in
# this graph, through layout ops only. Eager attention is recognised by its shape: a
# batched matmul whose scores reach a softmax within a few score ops.

_PASS_THROUGH = {aten.view, aten._unsafe_view, aten.expand, aten.unsqueeze, aten.clone,
                 aten._to_copy, aten.permute, aten.transpose, aten.alias, aten.reshape,
                 aten.slice}


_SOFTMAX = {aten._softmax, aten._safe_softmax, aten.softmax}
# what eager attention does between the scores bmm and its softmax (scale, mask, soft-cap,
# sink logits concatenated then cut off, the max subtracted) and between the softmax and the
# values bmm (dropout, a cast)
_SCORE_OPS = _PASS_THROUGH | {aten.mul, aten.div, aten.add, aten.sub, aten.tanh, aten.cat,
                              aten.where, aten.masked_fill, aten.native_dropout}


def _near(node: fx.Node, targets: set, forward: bool, depth: int = 8) -> bool:
    """Whether a value in ``targets`` (op packets) is within ``depth`` ops of ``node``,
    following users (``forward``) or tensor inputs, through ``_SCORE_OPS`` only."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in (n.users if forward else n.all_input_nodes):
                if m in seen or m.op != "call_function":
                    continue
                seen.add(m)
                op = getattr(m.target, "overloadpacket", None)
                if op in targets:
                    return True
                if op in _SCORE_OPS or m.target is operator.getitem:
                    nxt.append(m)
        frontier = nxt
    return False


def _is_attention_kv_use(user: fx.Node, n: fx.Node) -> bool:
    """Whether ``n`` is the key or value operand of attention op ``user``: the fused
    ``tp_backend.sdpa``, or eager attention's two batched matmuls (``softmax(q @ k^T) @ v``
    decomposes to ``bmm(q, k^T)`` whose output reaches a softmax, and ``bmm(p, v)`` whose
    first operand comes from one)."""
    if user.target is torch.ops.tp_backend.sdpa.default:
        return n is arg(user, "key") or n is arg(user, "value")
    if user.target is aten.bmm.default and arg(user, "mat2") is n:
        return _near(user, _SOFTMAX, forward=True) or _near(arg(user, "self"), _SOFTMAX, False)
    return False


def _feeds_attention_kv(node: fx.Node, depth: int = 10) -> bool:
    """Whether ``node`` reaches the key or value operand of an attention op through layout
    ops only (``repeat_kv``'s expand/reshape, a dtype cast): a key/value cache."""
    from ..leaf_ops import sdpa  # noqa: F401 - ensures the op exists

    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op != "call_function":
                    continue
                if _is_attention_kv_use(user, n):
                    return True
                if getattr(user.target, "overloadpacket", None) in _PASS_THROUGH:
                    nxt.append(user)
        frontier = nxt
    return False


def is_kv_cache(node: fx.Node, depth: int = 4) -> bool:
    """Whether output ``node`` is a key/value cache: it feeds attention as keys or values
    (:func:`_feeds_attention_kv`), or it is a layout op or slice of such a value (a sliding
    window cache keeps the last ``W - 1`` positions of the keys attention used)."""
    for _ in range(depth + 1):
        if _feeds_attention_kv(node):
            return True
        if node.op != "call_function" or \
                getattr(node.target, "overloadpacket", None) not in _PASS_THROUGH:
            return False
        node = arg(node, "self")
    return False
