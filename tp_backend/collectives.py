"""Collectives used in rewritten graphs, written with torch's functional collectives
(``torch.ops._c10d_functional``) so the graph stays traceable by AOTAutograd and Inductor.

Groups are passed by name (``ProcessGroup.group_name``), as the functional ops expect.
All-reduces over a group that :func:`tp_backend.shm.setup` accepted call DeepSpeed's
same-host shared-memory kernel instead (:mod:`tp_backend.shm`).
Letter key: N tp size, L local size of the gathered dim, o strided-shard outer factor.

Owns: the collective functions the rewritten graphs call, :func:`all_reduce`,
:func:`all_gather` (strided, blocked and uneven shards included) and
:func:`reduce_scatter`. Must not: decide where a collective goes (the solver marks the conversions, :mod:`tp_backend.rewrite` inserts the
calls), own the shared-memory kernel or decide which groups may use it
(:mod:`tp_backend.shm`), or run the eager collectives that keep the ranks in step
(:mod:`tp_backend.consistency`).
"""

from __future__ import annotations

import torch

from . import layers, shm
from .placement import Shard

__all__ = ["all_reduce", "all_gather", "reduce_scatter"]

_c10d = torch.ops._c10d_functional


def all_reduce(x: torch.Tensor, group_name: str, use_shm: bool = False) -> torch.Tensor:
    """Sum ``x`` (any shape) over the ranks of the group; every rank gets the sum.

    ``use_shm``: the group was accepted by :func:`tp_backend.shm.setup`; tensors the
    shared-memory kernel supports go through it, others through the group's backend."""
    if use_shm and shm.supports(x):
        return shm.shm_all_reduce(x.contiguous())
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def reduce_scatter(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int,
                   group_name: str, blocks: tuple | None = None, units: int | None = None,
                   use_shm: bool = False, counts: tuple | None = None) -> torch.Tensor:
    """Sum ``x`` (any shape, a partial sum) over the group and keep this rank's
    ``Shard(dim, outer, blocks, units, counts)`` of the sum (sequence parallelism: the tokens, dim
    ``dim`` of size ``T``, become ``T / N`` per rank).

    A plain shard goes through the group's reduce-scatter (``dim`` moved first, as
    ``reduce_scatter_tensor`` splits dim 0): the same bytes on the wire as an all-reduce's
    first half. Where the shared-memory kernel serves (``use_shm``, it only all-reduces)
    or the split is strided, blocked or uneven, the all-reduce then the local chunk."""
    plain = outer == 1 and blocks is None and units is None
    if not plain or use_shm and shm.supports(x):
        return layers.local_shard(all_reduce(x, group_name, use_shm), dim, outer, tp_rank,
                                  tp_size, blocks, units, counts).contiguous()
    y = x.movedim(dim, 0).contiguous()
    y = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(y, "sum", tp_size, group_name))
    return y.movedim(0, dim).contiguous()


def all_gather(x: torch.Tensor, dim: int, outer: int, tp_size: int, group_name: str,
               blocks: tuple | None = None, tp_rank: int | None = None,
               use_shm: bool = False, units: int | None = None,
               counts: tuple | None = None) -> torch.Tensor:
    """Inverse of a ``Shard(dim, outer, blocks, units, counts)`` split: each rank holds, for every block
    (``outer`` equal blocks, or the given ``blocks``), its chunk of it; returns the whole
    tensor on every rank.

    ``use_shm`` (the group was accepted by :func:`tp_backend.shm.setup`), where the chunk
    sizes are known at trace time: :func:`tp_backend.shm.shm_all_gather`
    (each rank writes its chunks into a zero buffer of the whole shape, summed in place by
    the shared-memory kernel: exact, 2.6-3.4x gloo's all-gather here at any size).

    Otherwise gloo's all-gather: the ranks' tensors are gathered as they are
    (``[N, *local]``, no transpose before the collective); one copy then moves the rank
    axis next to ``dim``, moving contiguous runs of the trailing dims rather than
    transposing element by element.
    """
    x = x.contiguous()
    if units is not None:
        return _all_gather_uneven(x, dim, outer, tp_size, group_name, units, tp_rank, counts)
    shape = list(x.shape)
    pieces = ([b // tp_size for b in blocks] if blocks is not None
              else [shape[dim] // outer] * outer)
    if use_shm and shm.supports(x) and all(isinstance(p, int) for p in pieces):
        return shm.shm_all_gather(x, dim, pieces, tp_size)
    g = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x, tp_size, group_name))  # [N*d0, ...]
    g = g.view(tp_size, *x.shape)  # [N, *local]
    if outer == 1 and blocks is None:
        g = g.movedim(0, dim)  # [..., N, L, ...]
        return g.reshape(shape[:dim] + [tp_size * shape[dim]] + shape[dim + 1:])
    parts = []
    for p in g.split(pieces, dim=dim + 1):  # per block: [N, ..., b/N, ...]
        p = p.movedim(0, dim)
        s = list(p.shape)
        parts.append(p.reshape(s[:dim] + [s[dim] * s[dim + 1]] + s[dim + 2:]))
    return torch.cat(parts, dim=dim)


def _all_gather_uneven(x: torch.Tensor, dim: int, outer: int, tp_size: int, group_name: str,
                       units: int, tp_rank: int, counts: tuple | None = None) -> torch.Tensor:
    """All-gather of an uneven split (``Shard(dim, outer, units=units, counts=counts)``):
    every rank pads its part to the largest, the padded parts are gathered, and each rank's
    real ranges (:meth:`~tp_backend.placement.Shard.ranges`) are put back in place, block
    by block."""
    shard = Shard(dim, outer, units=units, counts=counts)
    size = shard.global_size(x.shape[dim], tp_rank, tp_size)
    lengths = [[n for _, n in shard.ranges(size, r, tp_size)] for r in range(tp_size)]
    shape = list(x.shape)
    pad = max(map(sum, lengths)) - shape[dim]
    if pad:
        x = torch.cat([x, x.new_zeros(shape[:dim] + [pad] + shape[dim + 1:])], dim=dim)
    g = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x, tp_size, group_name))
    g = g.view(tp_size, *x.shape)  # [N, *padded local]
    pieces = [g[r].narrow(dim, 0, sum(lengths[r])).split(lengths[r], dim=dim)
              for r in range(tp_size)]
    return torch.cat([pieces[r][j] for j in range(outer) for r in range(tp_size)], dim=dim)
