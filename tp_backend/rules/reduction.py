"""Rules for reductions and normalisations: sum, mean, amax/amin, argmax/argmin, var,
var_mean, softmax, log_softmax, layer norm, cumulative ops, sort/topk.

A shard on a dim that is *not* reduced survives (renumbered if ``keepdim`` is false). A
``sum`` over the sharded dim yields ``Partial``; any other reduction over it is not proven
and falls back. ``Partial`` passes through ``sum``/``mean`` (they are linear) and nothing
else.
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE
from . import Decision, norm_dim, register

aten = torch.ops.aten

_LINEAR = (aten.sum, aten.mean)


# Ops whose reduced dims come after another argument: norm(x, p, dim, keepdim),
# linalg_vector_norm(x, ord, dim, keepdim).
_DIM_AFTER_ORDER = (aten.norm, aten.linalg_vector_norm)


def _dim_pos(node) -> int:
    return 2 if node.target.overloadpacket in _DIM_AFTER_ORDER else 1


def _reduced_dims(node, nd):
    k = _dim_pos(node)
    dims = node.args[k] if len(node.args) > k else node.kwargs.get("dim")
    if dims is None or dims == []:
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(d, nd) for d in dims]


def _keepdim(node):
    k = _dim_pos(node) + 1
    if len(node.args) > k and isinstance(node.args[k], bool):
        return node.args[k]
    return bool(node.kwargs.get("keepdim", False))


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
    x = node.args[0]
    p = ctx.placement(x)
    op = node.target.overloadpacket
    if p.is_replicate():
        return Decision(out=_wrap(node, REPLICATE))
    if p.is_partial():
        if op in _LINEAR:
            return Decision(out=PARTIAL)
        return Decision(out=_wrap(node, REPLICATE), inputs={x: REPLICATE})
    nd = len(ctx.shape(x))
    if op in (aten.max, aten.min) and len(node.args) == 1:
        dims = list(range(nd))
    elif op in (aten.prod,) and len(node.args) > 1 and isinstance(node.args[1], int):
        dims = [norm_dim(node.args[1], nd)]
    else:
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
    x = node.args[0]
    p = ctx.placement(x)
    if p.is_replicate():
        return Decision(out=_wrap(node, REPLICATE))
    if p.is_partial():
        return Decision(out=_wrap(node, REPLICATE), inputs={x: REPLICATE})
    nd = len(ctx.shape(x))
    op = node.target.overloadpacket
    if op is aten.topk:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    elif op is aten.sort:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    else:
        dim = node.args[1]
    if norm_dim(dim, nd) == p.dim:
        return None
    return Decision(out=_wrap(node, p))


@register(aten.native_layer_norm, aten.native_group_norm, aten._fused_rms_norm,
          aten.rms_norm, aten.layer_norm)
def _layer_norm(ctx, node):
    """Normalisation over the trailing ``len(normalized_shape)`` dims; weight/bias live there."""
    x = node.args[0]
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
    k = len(node.args[1])
    if p.dim >= nd - k:
        return None
    return Decision(out=_wrap(node, p), inputs=ins)
