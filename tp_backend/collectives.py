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


def all_gather(x: torch.Tensor, dim: int, outer: int, tp_size: int, group_name: str) -> torch.Tensor:
    """Inverse of a ``Shard(dim, outer)`` split: ``[..., o*L, ...]`` per rank ->
    ``[..., o*N*L, ...]`` with rank ``r``'s chunk at ``[r*L, (r+1)*L)`` of each outer block."""
    xt = x.movedim(dim, 0).contiguous()  # [o*L, *rest]
    g = _c10d.wait_tensor(_c10d.all_gather_into_tensor(xt, tp_size, group_name))  # [N*o*L, *rest]
    if outer != 1:
        rest = xt.shape[1:]
        local = xt.shape[0] // outer
        g = g.view(tp_size, outer, local, *rest).transpose(0, 1).reshape(outer * tp_size * local, *rest)
    return g.movedim(0, dim).contiguous()
