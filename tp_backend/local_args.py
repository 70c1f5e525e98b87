"""Local arguments: the arguments of an op that hold *global* sizes, rewritten to this
rank's local sizes from the solved placements.

Owns :data:`SIZE_ARGS` (for each op whose arguments name sizes, offsets or counts along a
dim, the function that gives their local values, by argument name) and :func:`local_args`,
which the rewrite calls for every node. A rule only decides placements; once the solver has fixed the output placement
and the placement each input is converted to, the local arguments follow from them alone:

* ``view``/``reshape``/``expand``: the size of the output's sharded dim becomes its local
  size, ``view(x, [B, S, 9, 64]) -> view(x, [B, S, 3, 64])`` at TP=3 (``-1`` stays);
* ``split``/``split_with_sizes`` of a block-sharded dim: each piece's local size;
* ``slice`` of a block-sharded dim (one of q/k/v of a fused projection): the block's local
  bounds; a slice over the whole dim, or a strided one, runs to the local end (``None``);
* ``convolution`` over whole channel groups: the local number of groups.

Local sizes differ by rank only for an uneven split (``Shard.units``), so the solution
itself is the same on every rank. Must not decide placements (:mod:`tp_backend.rules`
does) nor change the graph (:mod:`tp_backend.rewrite` applies the arguments returned here).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .placement import Placement, Shard
from .rules import arg, norm_dim, static_int
from .rules.indexing import slice_bounds

__all__ = ["SIZE_ARGS", "local_args"]

aten = torch.ops.aten

# ``fn(node, out, placement_of, tp_rank, tp_size) -> {argument name: local value}`` (empty
# where nothing changes): ``out`` is the node's solved placement (a tuple for multi-output
# ops), ``placement_of(input_node)`` the placement an input has once converted for it.
_Fn = Callable[[fx.Node, object, Callable[[fx.Node], Placement], int, int], dict]


def _sharded_dim(node, placement_of):
    """``(self, its split placement, dim)`` where ``self`` arrives split on the op's ``dim``
    argument, else ``None``."""
    x = arg(node, "self")
    p = placement_of(x)
    dim = norm_dim(arg(node, "dim"), x.meta["val"].dim())
    return (x, p, dim) if isinstance(p, Shard) and p.dim == dim else None


def _output_sizes(node, out, placement_of, tp_rank, tp_size):
    """``view(x, size)``, ``reshape(x, shape)``, ``expand(x, size)``: the output's (global)
    shape; its sharded dim gets the local size (``-1`` stays)."""
    if not isinstance(out, Shard):
        return {}
    name = "shape" if node.target.overloadpacket is aten.reshape else "size"
    sizes = list(arg(node, name))
    if sizes[out.dim] != -1:
        size = static_int(node.meta["val"].shape[out.dim])
        sizes[out.dim] = out.local_size(size, tp_rank, tp_size)
    return {name: sizes}


def _split(node, out, placement_of, tp_rank, tp_size):
    """``split(x, split_size, dim)``, ``split_with_sizes(x, split_sizes, dim)`` along a
    sharded dim: each piece (a run of whole blocks, see ``rules.indexing._split``) has its
    local size."""
    hit = _sharded_dim(node, placement_of)
    if hit is None:
        return {}
    _, _, dim = hit
    name = "split_size" if node.target.overloadpacket is aten.split else "split_sizes"
    sizes = arg(node, name)  # (split.Tensor: an int; split.sizes, split_with_sizes: a list)
    if isinstance(sizes, int):  # pieces of whole blocks, each split N ways
        return {name: sizes // tp_size}
    pieces = [static_int(v.shape[dim]) for v in node.meta["val"]]
    return {name: [o.local_size(s, tp_rank, tp_size) for o, s in zip(out, pieces)]}


def _slice(node, out, placement_of, tp_rank, tp_size):
    """``slice(x, dim, start, end, step)`` along a sharded dim: one block of a block shard
    becomes that block's local run, ``[start / N, end / N)``; a slice over the whole dim,
    or a strided one (``x[..., s::k]``, which keeps its start and step), runs to the local
    end."""
    hit = _sharded_dim(node, placement_of)
    if hit is None:
        return {}
    x, _, dim = hit
    if arg(node, "step") not in (None, 1):
        return {"end": None}
    size = static_int(x.meta["val"].shape[dim])
    start, end = slice_bounds(arg(node, "start"), arg(node, "end"), size)
    if (start, end) == (0, size):
        return {"start": None, "end": None}
    return {"start": start // tp_size, "end": end // tp_size}


def _convolution(node, out, placement_of, tp_rank, tp_size):
    """``convolution(input, weight, bias, ..., groups)`` with ``input`` split on whole
    channel groups: ``groups`` becomes the rank's number of groups."""
    x = arg(node, "input")
    p = placement_of(x)
    if not isinstance(p, Shard) or p.dim != 1:
        return {}
    c_in, groups = static_int(x.meta["val"].shape[1]), static_int(arg(node, "groups"))
    return {"groups": p.local_size(c_in, tp_rank, tp_size) // (c_in // groups)}


SIZE_ARGS: dict[object, _Fn] = {
    **dict.fromkeys((aten.view, aten._unsafe_view, aten.reshape, aten.view_copy, aten.expand,
                     aten.expand_copy), _output_sizes),
    **dict.fromkeys((aten.split, aten.split_with_sizes, aten.split_with_sizes_copy), _split),
    aten.slice: _slice,
    aten.convolution: _convolution,
}


def local_args(node: fx.Node, out, placement_of: Callable[[fx.Node], Placement],
               tp_rank: int, tp_size: int) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of ``node`` for rank ``tp_rank``'s local shapes, or ``None`` where
    they are unchanged (no size argument, or none along a sharded dim).

    Args:
        node: a call of an ATen overload, with ``meta["val"]`` (global shapes).
        out: its solved placement (a tuple of placements for multi-output ops).
        placement_of: the placement an input node has when ``node`` reads it (after the
            conversion the solver chose for that edge).
    """
    fn = SIZE_ARGS.get(getattr(node.target, "overloadpacket", None))
    changes = fn(node, out, placement_of, tp_rank, tp_size) if fn is not None else None
    if not changes:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, a in enumerate(node.target._schema.arguments):
        if a.name not in changes:
            continue
        if not a.kwarg_only and i < len(args):
            args[i] = changes[a.name]
        elif not a.kwarg_only and i == len(args):
            args.append(changes[a.name])
        else:
            kwargs[a.name] = changes[a.name]
    return tuple(args), kwargs
