"""Rules for element-wise ops (with broadcasting), dtype casts and copies.

A sharded operand keeps its shard on the aligned output dim (dims align from the right, as
in NumPy broadcasting). A replicated operand of full size along that dim is sliced locally
(free); one of size 1 there broadcasts as is.

``Partial`` (each rank holds an addend ``x_r`` of ``x = sum_r x_r``) passes through an op
``f`` only where ``f(x) = sum_r f(x_r)`` given the placements of the *other* operands. The
tables below say which ops have that property and for which operands (the sum-partial
rules of DTensor's ``binary_additive_ops``, ``binary_mul_ops`` and ``binary_div_ops`` in
``torch/distributed/tensor/_ops/_pointwise_ops.py``); every other op, and every other
combination, all-reduces its Partial operands first:

* ``LINEAR`` (``-x``, copies): ``f(sum x_r) = sum f(x_r)``, no other operand.
* ``ADDITIVE`` (``+``, ``-``): ``sum a_r + sum b_r = sum (a_r + b_r)``, both operands Partial.
  ``P + R`` or ``P + 2`` would add the replicated term once per rank (N times).
* ``BILINEAR`` (``*``): ``(sum a_r) * b = sum (a_r * b)`` only when ``b`` is the same whole
  value on every rank: Replicate or a scalar. ``P * S`` is neither Partial nor Shard (each
  addend meets a different slice of ``b`` and the shapes differ); ``P * P`` is quadratic.
* ``LINEAR_IN_FIRST`` (``/``): ``(sum a_r) / b = sum (a_r / b)``, ``b`` Replicate or a
  scalar, true division only; ``b / P`` and a rounding mode are not linear.
* ``CASTS``: ``cast(sum x_r) = sum cast(x_r)`` for the value cast (first operand) when the
  cast is exact for every addend: the same dtype, or a float widened to a float at least as
  wide. A narrowing cast rounds each addend; an int64 addend may round in float32.

Owns: the rule of the element-wise ops, casts and copies (``UNARY_OR_BINARY``, ``COPIES``)
and the tables of which operands a ``Partial`` passes through (``LINEAR``, ``ADDITIVE``,
``BILINEAR``, ``LINEAR_IN_FIRST``, ``CASTS``). Must not: insert the all-reduce or slice it
asks for (:mod:`tp_backend.rewrite`), rewrite arguments (:mod:`tp_backend.local_args`), or
resolve conflicts (:mod:`tp_backend.solver`).
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE
from . import Decision, arg, register, static_int, tensor_inputs

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
          aten.lift_fresh, aten.contiguous, aten.to, aten.type_as, aten._conj, aten.positive]

_WIDE = (torch.float32, torch.float64)


# Ops through which a Partial operand stays Partial (see the module docstring).
LINEAR = {aten.neg, aten.clone, aten.alias, aten.detach, aten.contiguous, aten.positive,
          aten.lift_fresh_copy, aten.lift_fresh}
ADDITIVE = {aten.add, aten.sub}
BILINEAR = {aten.mul}
LINEAR_IN_FIRST = {aten.div}
CASTS = {aten._to_copy, aten.to, aten.type_as}


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting each addend and summing after equals casting the sum: the same
    dtype, or a float widened to a float of at least the same width (integers are not:
    an int64 addend may round in float32)."""
    if src == dst:
        return True
    return src.is_floating_point and dst in _WIDE and torch.finfo(dst).bits >= torch.finfo(src).bits


def _partial_ok(node, pls) -> bool:
    """Whether the op maps the Partial operands in ``pls`` (input -> placement) to a
    Partial output, per the linearity tables of the module docstring."""
    op = node.target.overloadpacket
    partial = [a for a, p in pls.items() if p.is_partial()]
    others = [p for a, p in pls.items() if not p.is_partial()]
    if op in LINEAR:
        return True
    if op in ADDITIVE:
        # Both operands Partial and tensors (a scalar addend would be added N times).
        return isinstance(arg(node, "other"), torch.fx.Node) and len(partial) == 2 \
            and not others
    if op in BILINEAR:
        return len(partial) == 1 and all(p.is_replicate() for p in others)
    if op in LINEAR_IN_FIRST:  # true division only: a rounding mode is not linear
        return (arg(node, "rounding_mode") is None and partial == [arg(node, "self")]
                and all(p.is_replicate() for p in others))
    if op in CASTS:  # the value is the first operand; type_as's second only lends a dtype
        return (partial == [arg(node, "self")]
                and _exact_cast(partial[0].meta["val"].dtype, node.meta["val"].dtype))
    return False


def _elementwise(ctx, node):
    ins = tensor_inputs(node)
    if not ins:
        return Decision(out=REPLICATE)
    pls = {a: ctx.placement(a) for a in ins}
    need = {}
    if any(p.is_partial() for p in pls.values()):
        if _partial_ok(node, pls):
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


@register(aten.rand_like)
def _rand_like(ctx, node):
    # Uniform values of x's shape (a dropout mask): split where x is split, each rank
    # drawing its own part (the rewrite gives it a per-rank generator, tp_backend.rng), as
    # Megatron-LM draws masks of split activations; x's values are not read, so a partial x
    # needs no all-reduce and the values are replicated.
    x = arg(node, "self")
    p = ctx.placement(x)
    if p is not None and p.is_shard():
        return Decision(out=p)
    return Decision(out=REPLICATE, inputs={x: p} if p is not None else {})
