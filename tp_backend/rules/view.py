"""Rules for view and layout ops: view/_unsafe_view/reshape, expand, repeat,
permute/transpose/t, unsqueeze/squeeze, select.

The view rule maps a shard through a change of shape. Write the input as a flat index
space ``[L, F, C]`` where ``F`` is the sharded factor (for ``Shard(d, outer=o)``: ``F =
I[d] / o``, ``L = prod(I[:d]) * o``). The output keeps a shard if ``F`` starts inside one
output dim ``p`` at a whole offset ``o' = L / prod(O[:p])`` and the part of ``F`` that lies
in ``p`` is divisible by ``N``: the output is ``Shard(p, outer=o')``. This covers splitting
hidden features into heads (``[B,S,H*D] -> [B,S,H,D]``, needs ``H % N == 0``), merging them
back, and merging batch with heads (``[B,H,S,D] -> [B*H,S,D]``, a strided shard).
An uneven shard (``units``) passes where the part in ``p`` is a multiple of its units, so
every rank's run of units is whole indices of ``p``. Heads that ``N`` does not divide ask
the seed for an uneven split in whole heads (``ctx.prefer_units``) instead of failing,
and decide provisionally as if it were granted where the solver says another round
follows (``ctx.pending_units``).
Sizes may be symbolic (dynamic batch or sequence); the arithmetic is done on sympy
expressions so those stay exact.

Owns: the rules of ``view``/``reshape``, ``expand``, ``repeat`` and the layout ops, with
:func:`map_view_shard` and :func:`layout_dim_map` (which the solver also uses for a
parameter's chain). Must not: rewrite the size arguments to local sizes
(:mod:`tp_backend.local_args` does), change the graph (:mod:`tp_backend.rewrite`), or
pick the uneven split itself (it asks the seed with ``ctx.prefer_units``; the solver
decides).
"""

from __future__ import annotations

import sympy
import torch

from ..placement import PARTIAL, REPLICATE, Shard
from . import Decision, Indivisible, arg, norm_dim, register, static_int

aten = torch.ops.aten


def _expr(s):
    return s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(int(s))


def map_view_shard(in_shape, out_shape, shard: Shard, n: int):
    """Where ``shard`` of a tensor of ``in_shape`` lands after a view to ``out_shape``.

    Returns ``(Shard, None)`` on success, ``(None, reason)`` otherwise. ``reason`` is
    ``("indivisible", part, n)`` when the sharded features split into a leading part that
    ``n`` does not divide (e.g. 9 heads over 2 ranks), else a string. Sizes before the
    sharded factor may be symbolic (a dynamic batch or sequence): they are compared as
    sympy expressions; the sharded factor and the output dim holding it must be static.
    """
    if shard.blocks is not None:
        # Unequal blocks survive a view only if their dim passes through whole.
        out, why = map_view_shard(in_shape, out_shape, Shard(shard.dim), n)
        if out is None or out.outer != 1 or static_int(out_shape[out.dim]) != static_int(in_shape[shard.dim]):
            return None, "a block-sharded dim must pass through a view whole"
        return shard.moved(out.dim), None
    d, o = shard.dim, shard.outer
    size_d = static_int(in_shape[d])
    if size_d is None:
        return None, "sharded dim is symbolic"
    f = size_d // o
    lead = sympy.Integer(o)
    for s in in_shape[:d]:
        lead = lead * _expr(s)
    before = sympy.Integer(1)
    for k, s in enumerate(out_shape):
        ratio = lead / before
        if not ratio.is_Rational:  # (symbolic sizes only: simplify is slow)
            ratio = sympy.simplify(ratio)
        if ratio.is_Integer:
            r = int(ratio)
            size = static_int(s)
            if size is None:
                return None, "the sharded features land in a symbolic dim"
            if size > r:  # the sharded factor starts inside output dim k, at offset r
                if size % r:
                    return None, "sharded features do not start at a dim boundary"
                avail = size // r
                if avail >= f:
                    if avail % f:
                        return None, "sharded features straddle a dim"
                    part = f
                else:
                    if f % avail:
                        return None, "sharded features straddle a dim"
                    part = avail
                u = shard.units
                if u is None and part % n or u is not None and part % u:
                    # (uneven: the ranks' runs of units must be whole indices of dim k)
                    return None, ("indivisible", part, n)
                return Shard(k, r, units=u, counts=shard.counts), None
        elif sympy.fraction(sympy.together(ratio))[1] != 1:
            return None, "sharded features do not start at a dim boundary"
        before = before * _expr(s)
    return None, "no output dim holds the sharded features"


def _view(ctx, node):
    x = arg(node, "self")
    p = ctx.placement(x)
    if p.is_replicate():
        return Decision(out=REPLICATE)
    if p.is_partial():
        return Decision(out=PARTIAL)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node)
    out, why = map_view_shard(in_shape, out_shape, p, ctx.tp_size)
    if out is None:
        if isinstance(why, tuple) and why[1] < why[2]:
            # Fewer groups (e.g. KV heads) than ranks: keep the projection whole instead;
            # attention then gives each rank the KV head it needs.
            ctx.note(node, f"{why[1]} heads cannot split over tp_size={why[2]}: replicated")
            return None
        if isinstance(why, tuple) and p.outer == 1 and p.blocks is None \
                and ctx.prefer_units(x, p.dim, why[1]):
            # Split unevenly instead (9 heads -> 5 + 4): the seed is asked to deal out
            # whole groups next round. Where that round is sure to come, decide as if it
            # had (provisionally: this round is discarded), so that what follows -- the
            # attention, the output projection, the next layer asking its own seed --
            # settles in the same round rather than one layer per round.
            units = ctx.pending_units(x)
            if units is not None:
                ahead, _ = map_view_shard(in_shape, out_shape, Shard(p.dim, units=units),
                                          ctx.tp_size)
                if ahead is not None:
                    return Decision(out=ahead)
            ctx.note(node, f"{why[1]} heads split unevenly over tp_size={why[2]}")
            return None
        if isinstance(why, tuple):
            # No exact split: the seed stays whole (the pipeline warns, or raises
            # TPDivisibilityError under fallback="raise").
            _, part, n = why
            ctx.note(node, Indivisible(
                f"cannot shard {ctx.describe(x)}: viewing its {ctx.shape(x)[p.dim]} features "
                f"(shape {list(in_shape)} -> {list(out_shape)}) splits them into {part} groups "
                f"(e.g. attention heads), and {part} is not divisible by tp_size={n} (a "
                f"tp_size that divides {part} splits them)"))
            return None
        ctx.note(node, f"view {list(in_shape)} -> {list(out_shape)}: {why}")
        return None
    if arg(node, "size", "shape")[out.dim] != -1 and static_int(out_shape[out.dim]) is None:
        return None  # the local size must be a number (tp_backend.local_args writes it)
    return Decision(out=out)


register(aten.view, aten._unsafe_view, aten.reshape, aten.view_copy)(_view)


@register(aten.expand, aten.expand_copy)
def _expand(ctx, node):
    x = arg(node, "self")
    p = ctx.placement(x)
    if not p.is_shard():
        return Decision(out=p)
    off = len(ctx.shape(node)) - len(ctx.shape(x))
    return Decision(out=p.moved(p.dim + off))


@register(aten.repeat)
def _repeat(ctx, node):
    """``repeat`` tiles: along a dim repeated ``r`` times, output index ``j * G + i`` holds
    input index ``i``. Tiling each rank's chunks ``r`` times gives the chunks of the same
    blocks repeated ``r`` times, in order: a shard with its blocks repeated (a plain shard
    becomes ``outer=r``; JetMoE's keys repeated per expert, ``k.repeat(1, top_k, 1, 1)``,
    then line up with its queries). The repeats are unchanged; a Partial input stays
    Partial (tiling is linear)."""
    x = arg(node, "self")
    p = ctx.placement(x)
    if not p.is_shard():
        return Decision(out=p)
    reps = arg(node, "repeats")
    d = p.dim + len(reps) - len(ctx.shape(x))
    r = reps[d]
    if not isinstance(r, int) or r < 1:
        return None
    if p.blocks is not None:
        return Decision(out=Shard(d, blocks=tuple(p.blocks) * r))
    return Decision(out=Shard(d, p.outer * r, None, p.units, p.counts))


def _remap(ctx, node, fn):
    p = ctx.placement(arg(node, "self"))
    if not p.is_shard():
        return Decision(out=p)
    d = fn(p.dim)
    return Decision(out=p.moved(d)) if d is not None else None


_LAYOUT_OPS = {aten.permute, aten.permute_copy, aten.transpose, aten.transpose_copy, aten.t,
               aten.t_copy, aten.numpy_T, aten.unsqueeze, aten.unsqueeze_copy, aten.squeeze,
               aten.squeeze_copy, aten.select}


def layout_dim_map(node):
    """For an op that moves, adds or drops dims without changing any kept dim's size --
    ``permute``, ``transpose``, ``t``, ``unsqueeze``, ``squeeze``, ``select`` -- the map
    from an input dim to the output dim that holds it (``None`` where the dim is dropped);
    ``None`` for any other op. The rules below move a shard with it, and the solver maps a
    parameter's dims along its chain with it (``solver._chain_map``)."""
    op = getattr(node.target, "overloadpacket", None)
    if op not in _LAYOUT_OPS:
        return None
    in_shape = arg(node, "self").meta["val"].shape
    nd, nd_in = len(node.meta["val"].shape), len(in_shape)
    if op in (aten.permute, aten.permute_copy):
        dims = [norm_dim(d, nd) for d in arg(node, "dims")]
        return dims.index
    if op in (aten.transpose, aten.transpose_copy):
        a, b = norm_dim(arg(node, "dim0"), nd), norm_dim(arg(node, "dim1"), nd)
        return lambda d: b if d == a else a if d == b else d
    if op in (aten.t, aten.t_copy, aten.numpy_T):
        return lambda d: nd - 1 - d
    if op in (aten.unsqueeze, aten.unsqueeze_copy):
        k = norm_dim(arg(node, "dim"), nd)
        return lambda d: d + 1 if d >= k else d
    if op in (aten.squeeze, aten.squeeze_copy):
        dims = arg(node, "dim")  # (squeeze.dim: an int, squeeze.dims: a list)
        if dims is None:
            dims = [i for i, s in enumerate(in_shape) if static_int(s) == 1]
        else:
            dims = dims if isinstance(dims, (list, tuple)) else [dims]
            dims = [norm_dim(d, nd_in) for d in dims
                    if static_int(in_shape[norm_dim(d, nd_in)]) == 1]
        return lambda d: None if d in dims else d - sum(1 for k in dims if k < d)
    if op is aten.select:
        k = norm_dim(arg(node, "dim"), nd_in)
        return lambda d: None if d == k else d - (d > k)
    return None


@register(*_LAYOUT_OPS)
def _layout(ctx, node):
    """A shard moves with its dim; selecting along the split dim is refused."""
    return _remap(ctx, node, layout_dim_map(node))
