"""Placements: how one value of the graph is laid out across the tensor-parallel ranks.

The vocabulary is DTensor's (``torch.distributed.tensor.placement_types``), restricted to
one mesh axis:

* :class:`Replicate` -- every rank holds the whole tensor.
* :class:`Shard` -- every rank holds one of ``N`` equal, contiguous chunks of dim ``dim``.
  ``outer`` generalises this to a *strided* shard: dim ``dim`` of global size ``G`` is read
  as ``[outer, G // outer]`` and the chunks are taken along the second factor. This is what
  a view that merges ``(B, H)`` into ``B*H`` produces when ``H`` (heads) is sharded.
* :class:`Partial` -- every rank holds a tensor of the full shape whose element-wise sum
  over the ranks is the true value (the output of a row-parallel matmul before all-reduce).

Converting ``Replicate -> Shard`` is free (a local slice), ``Partial -> Replicate`` costs an
all-reduce and ``Shard -> Replicate`` an all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Placement", "Replicate", "Shard", "Partial", "REPLICATE", "PARTIAL"]


class Placement:
    """Base class of the three placements."""

    def is_replicate(self) -> bool:
        return isinstance(self, Replicate)

    def is_shard(self, dim: int | None = None) -> bool:
        return isinstance(self, Shard) and (dim is None or self.dim == dim)

    def is_partial(self) -> bool:
        return isinstance(self, Partial)


@dataclass(frozen=True)
class Replicate(Placement):
    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard(Placement):
    dim: int
    outer: int = 1

    def __repr__(self) -> str:
        return f"S({self.dim})" if self.outer == 1 else f"S({self.dim},outer={self.outer})"


@dataclass(frozen=True)
class Partial(Placement):
    def __repr__(self) -> str:
        return "P"


REPLICATE = Replicate()
PARTIAL = Partial()
