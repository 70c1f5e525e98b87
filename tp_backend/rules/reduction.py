"""Rules for reductions and normalisations: sum, mean, amax/amin, argmax/argmin, var,
var_mean, softmax, log_softmax, layer norm, cumulative ops, sort/topk.

A shard on a dim that is *not* reduced survives (renumbered if ``keepdim`` is false). A
``sum`` over the sharded dim yields ``Partial``; any other reduction over it is not proven
and falls back. ``Partial`` passes through ``sum``/``mean`` (they are linear) and nothing
else.

Owns: the rules of the reductions (``sum``, ``mean``, ``amax``, ``var``, ``norm``...),
the ops along one dim (softmax, log-softmax, cumulative ops, ``sort``, ``topk``) and the
normalisations (layer, group and RMS norm). Must not: insert the all-reduce of a
``Partial`` it yields (:mod:`tp_backend.rewrite`, where the solver places it), or rewrite
arguments (:mod:`tp_backend.local_args`).
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE
from . import Decision, arg, norm_dim, register

aten = torch.ops.aten

# Reductions through which a Partial input stays Partial: linear in their input,
# sum(sum_r x_r) = sum_r sum(x_r) and mean(sum_r x_r) = sum_r mean(x_r) (a fixed 1/n scale).
# Every other reduction (amax, var, norm, prod...) is not, and all-reduces its input first.
LINEAR = (aten.sum, aten.mean)


def _reduced_dims(node, nd):
    """The dims a reduction reduces: its ``dim`` argument (any overload: ``sum(x, dim)``,
    ``norm(x, p, dim)``, ``prod(x, dim)``), all dims where it has none or it is empty."""
    dims = arg(node, "dim")
    if dims is None or dims == []:
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(d, nd) for d in dims]


def _keepdim(node):
    return bool(arg(node, "keepdim", default=False))


def _n_out(node):
    val = node.meta.get("val")
    return len(val) if isinstance(val, (tuple, list)) else 0


def _wrap(node, p):
    n = _n_out(node)
    return tuple(p for _ in range(n)) if n else p


@register(aten.sum, aten.mean, aten.amax, aten.amin, aten.argmax, aten.argmin, aten.var,
          aten.var_mean, aten.std, aten.std_mean, aten.prod, aten.any, aten.all,
          aten.logsumexp, aten.max, aten.min, aten.norm, aten.linalg_vector_norm)
def _reduce(ctx, node):
    x = arg(node, "self")
    p = ctx.placement(x)
    op = node.target.overloadpacket
    if p.is_replicate():
        return Decision(out=_wrap(node, REPLICATE))
    if p.is_partial():
        if op in LINEAR:
            return Decision(out=PARTIAL)
        return Decision(out=_wrap(node, REPLICATE), inputs={x: REPLICATE})
    nd = len(ctx.shape(x))
    dims = _reduced_dims(node, nd)
    if p.dim in dims:
        if op is aten.sum and len(dims) >= 1:
            return Decision(out=PARTIAL)
        return None
    d = p.dim if _keepdim(node) else p.dim - sum(1 for k in dims if k < p.dim)
    return Decision(out=_wrap(node, p.moved(d)))


@register(aten._softmax, aten._log_softmax, aten.softmax, aten.log_softmax, aten.cumsum,
          aten.cumprod, aten.sort, aten.topk, aten.cummax, aten.cummin, aten.logcumsumexp)
def _along_dim(ctx, node):
    """Ops that work along one dim and keep the shape (topk/sort keep the rank)."""
    x = arg(node, "self")
    p = ctx.placement(x)
    if p.is_replicate():
        return Decision(out=_wrap(node, REPLICATE))
    if p.is_partial():
        return Decision(out=_wrap(node, REPLICATE), inputs={x: REPLICATE})
    nd = len(ctx.shape(x))
    if norm_dim(arg(node, "dim"), nd) == p.dim:
        return None
    return Decision(out=_wrap(node, p))


@register(aten.native_layer_norm, aten.native_group_norm, aten._fused_rms_norm,
          aten.rms_norm, aten.layer_norm)
def _layer_norm(ctx, node):
    """Normalisation over the trailing ``len(normalized_shape)`` dims; weight/bias live there."""
    x = arg(node, "input")
    p = ctx.placement(x)
    ins = {a: REPLICATE for a in node.all_input_nodes if a is not x}
    if p.is_replicate() or node.target.overloadpacket is aten.native_group_norm:
        if not p.is_replicate():
            return None
        return Decision(out=_wrap(node, REPLICATE), inputs=ins)
    if p.is_partial():
        ins[x] = REPLICATE
        return Decision(out=_wrap(node, REPLICATE), inputs=ins)
    nd = len(ctx.shape(x))
    k = len(arg(node, "normalized_shape"))
    if p.dim >= nd - k:
        return None
    return Decision(out=_wrap(node, p), inputs=ins)
