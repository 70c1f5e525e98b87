"""Rules for matrix products: mm, addmm, bmm, baddbmm, grouped_mm (each from its einsum
string through one generator, :func:`einsum_decision`), and triangular solves.

``mm(a, b)`` is ``"mk,kn->mn"`` with ``a: [M, K]`` and ``b: [K, N]`` (an ``nn.Linear`` is
``mm(x, W.t())`` with ``W: [out, in]``, so ``b``'s dim 1 is ``W``'s dim 0):

* column-parallel (Megatron, arXiv:1909.08053 section 3): ``a`` replicated, ``b`` a
  parameter split on ``N`` -> output ``Shard(1)``. This is a *seed*: the solver may veto it.
* row-parallel: ``a`` split on ``K`` (the output of a column-parallel region), ``b`` split
  on ``K`` -> output ``Partial`` (all-reduced later, where a non-linear op needs it whole).
* ``a`` split on ``M`` (rows) keeps the split; ``Partial`` times replicated stays Partial.

``addmm(bias, a, b)`` follows ``mm``; a row-parallel addmm adds the bias once, after the
all-reduce (``Action.ROW_ADDMM``), never once per rank; under sequence parallelism the first
rank adds it to its partial product (``Action.ROW_ADDMM_PARTIAL``: the sum stays partial).

Owns: the rules of ``mm``, ``bmm``, ``addmm``/``baddbmm``, grouped matmuls and
``linalg_solve_triangular``, the column-parallel seed, and :func:`einsum_decision`.
Must not: insert the all-reduce or add the bias (the row-parallel linear that
:mod:`tp_backend.rewrite` inserts from :mod:`tp_backend.layers`' parts),
rewrite arguments (:mod:`tp_backend.local_args`), or veto a seed (:mod:`tp_backend.solver`).
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE, Shard
from . import Action, Decision, Role, arg, divisible, register, register_by_name, static_int

aten = torch.ops.aten


def _column_seed(ctx, node, weight, n_features: int, out_dim: int, weight_dim: int):
    """Column-parallel decision for a product of a replicated input with ``weight`` (a
    parameter) whose ``n_features`` output features are on ``weight_dim``; the output's
    features are on ``out_dim``. ``None`` if no seed is allowed here.

    A fused projection whose output is later split (q|k|v, gate|up) shards each block
    separately: the consumers' cut points come back as a preference (see the solver).
    Features that ``tp_size`` does not divide split unevenly, one feature as the unit; a
    consumer that needs whole groups (heads: 9 heads at TP=2 go 5 + 4) asks for those as
    the unit (``ctx.units_preference``). An even split the work balance weights
    (``ctx.balance_counts``) deals its features by those counts instead."""
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
        counts = None if blocks else ctx.balance_counts(node)
        out = (Shard(out_dim, blocks=blocks) if blocks else
               Shard(out_dim, units=n_features, counts=counts) if counts else Shard(out_dim))
    return Decision(out=out, inputs={weight: out.moved(weight_dim)}, roles={weight: Role.COLUMN},
                    seed=Role.COLUMN)


def einsum_decision(ctx, node, spec: str, a, b, *, fixed: str = "") -> Decision | None:
    """Placements for a product of ``a`` and ``b`` written as an einsum ``spec`` such as
    ``"mk,kn->mn"``; ``b`` is the weight side (a parameter, for a linear layer). Each label
    is a *batch* (in both operands and the output), *free* (in one operand and the output)
    or *contracted* (in both operands, not the output) index; labels in ``fixed`` are never
    split (grouped matmul: the tokens, whose expert offsets are global, and the experts).

    * Both whole: the product is whole, or column-parallel if ``b`` is a parameter that
      may seed a split of its free label (Megatron's column-parallel linear).
    * One Partial, the other whole: Partial (the product is linear in each operand).
    * A shard on label ``L`` (of one operand, or the same split of both): every operand
      that has ``L`` takes that split (a free local slice of a whole one). The output is
      split on ``L`` if it keeps ``L``, else Partial: each rank sums its own run of the
      contracted index (row-parallel when ``a`` brought the split and ``b`` is the weight).
    * Shards on two different labels, or any other Partial: not proven (``None``).

    DTensor derives its matrix-product strategies from einsum strings the same way
    (``torch/distributed/tensor/_ops/_einsum_strategy.py``)."""
    ins, lo = spec.split("->")
    la, lb = ins.split(",")
    pa, pb = ctx.placement(a), ctx.placement(b)
    if pa.is_partial() or pb.is_partial():
        if pa.is_partial() and pb.is_replicate() or pa.is_replicate() and pb.is_partial():
            return Decision(out=PARTIAL)
        return None
    if pa.is_replicate() and pb.is_replicate():
        free_b = [c for c in lb if c in lo and c not in la]
        if len(free_b) == 1:
            wd, od = lb.index(free_b[0]), lo.index(free_b[0])
            seed = _column_seed(ctx, node, b, ctx.shape(b)[wd], od, wd)
            if seed is not None:
                return seed
        return Decision(out=REPLICATE)
    split = {la[pa.dim]} if pa.is_shard() else set()
    split |= {lb[pb.dim]} if pb.is_shard() else set()
    if len(split) != 1 or split & set(fixed):
        return None
    label, = split
    src, p = (a, pa) if pa.is_shard() else (b, pb)  # the operand that brought the split
    inputs = {}
    for x, px, labels in ((a, pa, la), (b, pb, lb)):
        if label not in labels:
            continue
        want = p.moved(labels.index(label))
        if px.is_shard() and px != want:
            return None
        if x is not src or label in lo:
            inputs[x] = want
    if label in lo:
        return Decision(out=p.moved(lo.index(label)), inputs=inputs)
    roles = {b: Role.ROW} if pa.is_shard() else {}
    return Decision(out=PARTIAL, inputs=inputs, roles=roles)


# The products by their einsum, for ``a @ b`` over the last two dims (bmm: batch first).
MM, BMM = "mk,kn->mn", "bmk,bkn->bmn"


@register(aten.mm)
def _mm(ctx, node):
    return einsum_decision(ctx, node, MM, arg(node, "self"), arg(node, "mat2"))


@register(aten.bmm)
def _bmm(ctx, node):
    return einsum_decision(ctx, node, BMM, arg(node, "self"), arg(node, "mat2"))


@register(aten.addmm, aten.baddbmm)
def _addmm(ctx, node):
    bias, a, b = arg(node, "self"), arg(node, "mat1", "batch1"), arg(node, "mat2", "batch2")
    spec = MM if node.target.overloadpacket is aten.addmm else BMM
    dec = einsum_decision(ctx, node, spec, a, b)
    if dec is None or not isinstance(bias, torch.fx.Node):
        return dec
    pbias = ctx.placement(bias)
    if dec.out.is_partial():
        # Row-parallel: all-reduce the product, then add the (replicated) bias once. Under
        # sequence parallelism the bias is added once before the sum instead (by the first
        # rank), so the partial sum can be reduce-scattered where its consumers allow.
        dec.inputs[bias] = REPLICATE
        if getattr(ctx, "sequence_parallel", False):
            return Decision(out=PARTIAL, inputs=dec.inputs, roles=dec.roles,
                            action=Action.ROW_ADDMM_PARTIAL)
        return Decision(out=REPLICATE, inputs=dec.inputs, roles=dec.roles,
                        action=Action.ROW_ADDMM)
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
        if dec.seed is Role.COLUMN:
            dec.roles[bias] = Role.COLUMN
    elif pbias.is_shard():
        return None
    return dec


@register_by_name("transformers::grouped_mm_fallback", "aten::_grouped_mm")
def _grouped_mm(ctx, node):
    dec = _grouped_mm_decision(ctx, node)
    if dec is not None and node.target is aten._grouped_mm.default:
        # torch._grouped_mm wants every stride a multiple of 16 bytes: so must every rank's
        # part of the split K or N be (the split is refused otherwise).
        w = arg(node, "mat2")
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
    # (aten._grouped_mm names them self and mat2; transformers' fallback input and weight)
    x, w = arg(node, "self", "input"), arg(node, "mat2", "weight")
    others = [a for a in node.all_input_nodes if a not in (x, w)]
    if any(not ctx.placement(a).is_replicate() for a in others):
        return None
    return einsum_decision(ctx, node, "tk,ekn->tn", x, w, fixed="te")


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
    a, b, left = arg(node, "self"), arg(node, "B"), arg(node, "left")
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
