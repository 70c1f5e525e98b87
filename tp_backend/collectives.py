"""Collectives used in rewritten graphs, written with torch's functional collectives
(``torch.ops._c10d_functional``) so the graph stays traceable by AOTAutograd and Inductor.

Groups are passed by name (``ProcessGroup.group_name``), as the functional ops expect.
Letter key: N tp size, L local size of the gathered dim, o strided-shard outer factor.
"""

from __future__ import annotations

import torch

__all__ = ["all_reduce", "all_gather"]

_c10d = torch.ops._c10d_functional


def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum ``x`` (any shape) over the ranks of the group; every rank gets the sum."""
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def all_gather(x: torch.Tensor, dim: int, outer: int, tp_size: int, group_name: str,
               blocks: tuple | None = None) -> torch.Tensor:
    """Inverse of a ``Shard(dim, outer, blocks)`` split: each rank holds, for every block
    (``outer`` equal blocks, or the given ``blocks``), its chunk of it; returns the whole
    tensor on every rank."""
    xt = x.movedim(dim, 0).contiguous()  # [L, *rest], L = sum of this rank's chunks
    g = _c10d.wait_tensor(_c10d.all_gather_into_tensor(xt, tp_size, group_name))  # [N*L, *rest]
    if outer != 1 or blocks is not None:
        rest = xt.shape[1:]
        local = xt.shape[0]
        pieces = [b // tp_size for b in blocks] if blocks is not None else [local // outer] * outer
        per_rank = g.view(tp_size, local, *rest).split(pieces, dim=1)  # per block: [N, b/N, *rest]
        g = torch.cat([p.reshape(p.shape[0] * p.shape[1], *rest) for p in per_rank], dim=0)
    return g.movedim(0, dim).contiguous()
