"""Rules for matrix products: mm, addmm, bmm, baddbmm, grouped_mm, and triangular solves.

``mm(a, b)`` with ``a: [M, K]`` and ``b: [K, N]`` (an ``nn.Linear`` is ``mm(x, W.t())``
with ``W: [out, in]``, so ``b``'s dim 1 is ``W``'s dim 0):

* column-parallel (Megatron, arXiv:1909.08053 section 3): ``a`` replicated, ``b`` a
  parameter split on ``N`` -> output ``Shard(1)``. This is a *seed*: the solver may veto it.
* row-parallel: ``a`` split on ``K`` (the output of a column-parallel region), ``b`` split
  on ``K`` -> output ``Partial`` (all-reduced later, where a non-linear op needs it whole).
* ``a`` split on ``M`` (rows) keeps the split; ``Partial`` times replicated stays Partial.

``addmm(bias, a, b)`` follows ``mm``; a row-parallel addmm adds the bias once, after the
all-reduce (``action="row_addmm"``), never once per rank.
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE, Shard
from . import Decision, divisible, register, register_by_name, static_int

aten = torch.ops.aten


def _column_seed(ctx, node, weight, n_features: int, out_dim: int, weight_dim: int):
    """Column-parallel decision for a product of a replicated input with ``weight`` (a
    parameter) whose ``n_features`` output features are on ``weight_dim``; the output's
    features are on ``out_dim``. ``None`` if no seed is allowed here.

    A fused projection whose output is later split (q|k|v, gate|up) shards each block
    separately: the consumers' cut points come back as a preference (see the solver).
    Features that ``tp_size`` does not divide split unevenly, one feature as the unit; a
    consumer that needs whole groups (heads: 9 heads at TP=2 go 5 + 4) asks for those as
    the unit (``ctx.units_preference``)."""
    if not (ctx.is_param(weight) and ctx.can_seed(node)):
        return None
    n = ctx.tp_size
    n_features = static_int(n_features)
    units = ctx.units_preference(node)
    if units is None and n_features is not None and n_features % n:
        units = n_features  # (uneven, one feature per unit)
    if units is not None and units % n == 0 and n_features is not None \
            and n_features % units == 0:
        units = None  # whole units per rank, the same count on each: the plain split
    if units is not None:
        if n_features is None or units < n or n_features % units or ctx.preference(node):
            return None
        out = Shard(out_dim, units=units)
    else:
        if not divisible(n_features, n):
            return None
        blocks = ctx.preference(node)
        if blocks and not all(divisible(bl, n) for bl in blocks):
            return None
        out = Shard(out_dim, blocks=blocks) if blocks else Shard(out_dim)
    return Decision(out=out, inputs={weight: out.moved(weight_dim)}, roles={weight: "column"},
                    seed="column")


def _mm_decision(ctx, node, a, b):
    """Placements for ``a @ b`` over the last two dims; batch dims (bmm) are dim 0."""
    pa, pb = ctx.placement(a), ctx.placement(b)
    nd = len(ctx.shape(node))
    m_dim, k_a, k_b, n_dim = nd - 2, nd - 1, nd - 2, nd - 1
    if pa.is_partial() or pb.is_partial():
        if pa.is_partial() and pb.is_replicate() or pa.is_replicate() and pb.is_partial():
            return Decision(out=PARTIAL)
        return None
    if pa.is_replicate() and pb.is_replicate():
        seed = _column_seed(ctx, node, b, ctx.shape(b)[n_dim], n_dim, n_dim)
        return seed or Decision(out=REPLICATE)
    if nd == 3:  # bmm: a shared batch shard stays a batch shard
        if pa.is_shard(0) or pb.is_shard(0):
            p = pa if pa.is_shard(0) else pb
            if (pa.is_replicate() or pa == p) and (pb.is_replicate() or pb == p):
                return Decision(out=p, inputs={a: p, b: p})
            return None
    if pa.is_shard(m_dim) and pb.is_replicate():
        return Decision(out=pa)
    if pa.is_replicate() and pb.is_shard(n_dim):
        return Decision(out=pb)
    if pa.is_shard(k_a) and (pb.is_replicate() or pb == pa.moved(k_b)):
        return Decision(out=PARTIAL, inputs={b: pa.moved(k_b)}, roles={b: "row"})
    if pb.is_shard(k_b) and pa.is_replicate():
        return Decision(out=PARTIAL, inputs={a: pb.moved(k_a)})
    return None


@register(aten.mm, aten.bmm)
def _mm(ctx, node):
    return _mm_decision(ctx, node, node.args[0], node.args[1])


@register(aten.addmm, aten.baddbmm)
def _addmm(ctx, node):
    bias, a, b = node.args[:3]
    dec = _mm_decision(ctx, node, a, b)
    if dec is None or not isinstance(bias, torch.fx.Node):
        return dec
    pbias = ctx.placement(bias)
    if dec.out.is_partial():
        # Row-parallel: all-reduce the product, then add the (replicated) bias once.
        dec.inputs[bias] = REPLICATE
        return Decision(out=REPLICATE, inputs=dec.inputs, roles=dec.roles, action="row_addmm")
    if pbias.is_partial():
        return None
    if dec.out.is_replicate():
        if pbias.is_shard():
            return None
        return dec
    out_nd = len(ctx.shape(node))
    bshape = ctx.shape(bias)
    k = dec.out.dim - (out_nd - len(bshape))
    if k >= 0 and static_int(bshape[k]) != 1:
        dec.inputs[bias] = dec.out.moved(k)
        if dec.seed == "column":
            dec.roles[bias] = "column"
    elif pbias.is_shard():
        return None
    return dec


@register_by_name("transformers::grouped_mm_fallback", "aten::_grouped_mm")
def _grouped_mm(ctx, node):
    dec = _grouped_mm_decision(ctx, node)
    if dec is not None and node.target is aten._grouped_mm.default:
        # torch._grouped_mm wants every stride a multiple of 16 bytes: so must every rank's
        # part of the split K or N be (the split is refused otherwise).
        w = node.args[1]
        pw = dec.inputs.get(w, ctx.placement(w))
        if pw.is_shard() and not _aligned(ctx.shape(w)[pw.dim], pw,
                                          w.meta["val"].element_size(), ctx.tp_size):
            return None
    return dec


def _grouped_mm_decision(ctx, node):
    """Mixture-of-experts grouped matmul: ``x: [T, K]`` (tokens sorted by expert) times
    ``w: [E, K, N]`` with per-expert token offsets. The experts' weights split like an MLP's:
    column-parallel on ``N`` (a seed), or row-parallel on ``K`` (Partial output); the
    router and the offsets stay replicated."""
    x, w = node.args[0], node.args[1]
    others = [a for a in node.all_input_nodes if a not in (x, w)]
    if any(not ctx.placement(a).is_replicate() for a in others):
        return None
    px, pw = ctx.placement(x), ctx.placement(w)
    if px.is_partial() and pw.is_replicate():
        return Decision(out=PARTIAL)
    if px.is_replicate() and pw.is_replicate():
        seed = _column_seed(ctx, node, w, ctx.shape(w)[2], 1, 2)
        return seed or Decision(out=REPLICATE)
    if px.is_replicate() and pw.is_shard(2):
        return Decision(out=pw.moved(1))
    if px.is_shard(1) and (pw.is_replicate() or pw == px.moved(1)):
        return Decision(out=PARTIAL, inputs={w: px.moved(1)}, roles={w: "row"})
    return None


def _aligned(size, p: Shard, itemsize: int, tp_size: int) -> bool:
    """Whether every rank's part of a dim of ``size`` elements split as ``p`` spans a
    multiple of 16 bytes."""
    size = static_int(size)
    if size is None:
        return False
    return all(p.local_size(size, r, tp_size) * itemsize % 16 == 0 for r in range(tp_size))


@register(aten.linalg_solve_triangular)
def _solve_triangular(ctx, node):
    """``X = linalg_solve_triangular(A, B, upper=..., left=True)`` solves ``A X = B``
    with ``A: [*, n, n]`` triangular and ``B: [*, n, k]`` (``left=False``: ``X A = B``,
    ``B: [*, k, n]``); batch dims broadcast. Every column of ``X`` (row, for ``left=False``)
    depends only on the same column of ``B``, and every batch entry only on its own ``A``
    and ``B``, so a shard on a batch dim (heads: gated DeltaNet's chunked delta rule) or on
    ``B``'s free dim with ``A`` whole stays. ``X`` is linear in ``B``: Partial ``B`` with a
    replicated ``A`` stays Partial. Splitting ``n`` couples the ranks: not proven."""
    a, b = node.args[0], node.args[1]
    left = node.kwargs.get("left", True)  # (upper, left, unitriangular are keyword-only)
    pa, pb = ctx.placement(a), ctx.placement(b)
    nd, nd_a, nd_b = len(ctx.shape(node)), len(ctx.shape(a)), len(ctx.shape(b))
    if pa.is_partial():
        return None
    if pb.is_partial():
        return Decision(out=PARTIAL) if pa.is_replicate() else None
    if pa.is_replicate() and pb.is_replicate():
        return Decision(out=REPLICATE)
    free = nd_b - 1 if left else nd_b - 2
    if pb.is_shard(free) and pa.is_replicate():
        return Decision(out=pb.moved(nd - nd_b + free))
    # a batch dim: both operands take the shard where they have that dim (not broadcast)
    ref = pa if pa.is_shard() else pb
    d = ref.dim + nd - (nd_a if ref is pa else nd_b)  # the output's dim
    if d >= nd - 2:
        return None
    need = {}
    for t, p, k in ((a, pa, nd_a), (b, pb, nd_b)):
        dt = d - (nd - k)
        if dt < 0 or static_int(ctx.shape(t)[dt]) == 1:
            if not p.is_replicate():
                return None
            continue
        want = ref.moved(dt)
        if p.is_replicate():
            need[t] = want
        elif p != want:
            return None
    return Decision(out=ref.moved(d), inputs=need)
