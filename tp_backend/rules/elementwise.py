"""Rules for element-wise ops (with broadcasting), dtype casts and copies.

A sharded operand keeps its shard on the aligned output dim (dims align from the right, as
in NumPy broadcasting). A replicated operand of full size along that dim is sliced locally
(free); one of size 1 there broadcasts as is. ``Partial`` passes only through ops that are
linear in it: ``P + P``, ``P - P``, ``P * R``, ``P / R``, ``-P`` and copies/up-casts.
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE
from . import Decision, register, static_int, tensor_inputs

aten = torch.ops.aten

UNARY_OR_BINARY = [
    aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.neg, aten.pow, aten.exp, aten.exp2,
    aten.expm1, aten.log, aten.log1p, aten.log2, aten.log10, aten.sqrt, aten.rsqrt,
    aten.reciprocal, aten.square, aten.sigmoid, aten.tanh, aten.silu, aten.gelu, aten.relu,
    aten.leaky_relu, aten.elu, aten.hardtanh, aten.hardswish, aten.hardsigmoid, aten.softplus,
    aten.mish, aten.erf, aten.erfc, aten.erfinv, aten.sin, aten.cos, aten.tan, aten.asin,
    aten.acos, aten.atan, aten.atan2, aten.sinh, aten.cosh, aten.abs, aten.sign, aten.floor,
    aten.ceil, aten.round, aten.trunc, aten.frac, aten.clamp, aten.clamp_min, aten.clamp_max,
    aten.minimum, aten.maximum, aten.fmod, aten.remainder, aten.eq, aten.ne, aten.lt, aten.le,
    aten.gt, aten.ge, aten.logical_and, aten.logical_or, aten.logical_not, aten.logical_xor,
    aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.bitwise_xor, aten.where,
    aten.masked_fill, aten.isnan, aten.isinf, aten.nan_to_num, aten.lerp, aten.addcmul,
    aten.addcdiv, aten.logit, aten.hypot, aten.copysign, aten.fill, aten.zeros_like,
    aten.ones_like, aten.full_like, aten.empty_like, aten.copy, aten.floor_divide,
    aten.sgn, aten.signbit, aten.igamma, aten.xlogy, aten.heaviside,
]
COPIES = [aten._to_copy, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy,
          aten.contiguous, aten.to, aten.type_as, aten._conj, aten.positive]

_WIDE = (torch.float32, torch.float64)


def _partial_ok(ctx, node, ins, pls) -> bool:
    """Whether the op is linear in its Partial operands (so the output is Partial)."""
    op = node.target.overloadpacket
    nparts = sum(p.is_partial() for p in pls.values())
    tensors_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if op in (aten.add, aten.sub):
        # P + P only: adding a replicated value or a scalar would add it N times.
        return len(tensors_args) == 2 and nparts == 2 and len(ins) == 2
    if op is aten.mul:
        return nparts == 1
    if op is aten.div:
        return nparts == 1 and isinstance(node.args[0], torch.fx.Node) and pls[node.args[0]].is_partial()
    if op is aten.neg or op in (aten.clone, aten.alias, aten.detach, aten.contiguous, aten.positive):
        return True
    if op in (aten._to_copy, aten.to, aten.type_as):
        # Casting partial sums first and summing after is exact only when the cast does not
        # lose precision: allow up-casts to fp32/fp64 and same-dtype copies.
        src = ins[0].meta["val"].dtype
        dst = node.meta["val"].dtype
        return dst == src or dst in _WIDE
    return False


def _elementwise(ctx, node):
    ins = tensor_inputs(node)
    if not ins:
        return Decision(out=REPLICATE)
    pls = {a: ctx.placement(a) for a in ins}
    need = {}
    if any(p.is_partial() for p in pls.values()):
        if _partial_ok(ctx, node, ins, pls):
            return Decision(out=PARTIAL)
        for a, p in pls.items():
            if p.is_partial():  # all-reduce first
                need[a] = REPLICATE
                pls[a] = REPLICATE
    out_nd = len(ctx.shape(node))
    shards = set()
    for a, p in pls.items():
        if p.is_shard():
            shards.add(p.moved(p.dim + out_nd - len(ctx.shape(a))))
    if not shards:
        return Decision(out=REPLICATE, inputs=need)
    if len(shards) > 1:
        return None  # operands sharded on different dims: no local evaluation
    out, = shards
    for a, p in pls.items():
        if p.is_replicate():
            shape = ctx.shape(a)
            k = out.dim - (out_nd - len(shape))
            if k >= 0 and static_int(shape[k]) != 1:
                need[a] = out.moved(k)  # free local slice of a replicated operand
    return Decision(out=out, inputs=need)


register(*UNARY_OR_BINARY, *COPIES)(_elementwise)
