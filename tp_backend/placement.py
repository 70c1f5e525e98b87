"""Placements: how one value of the graph is laid out across the tensor-parallel ranks.

The vocabulary is DTensor's (``torch.distributed.tensor.placement_types``), restricted to
one mesh axis:

* :class:`Replicate` -- every rank holds the whole tensor.
* :class:`Shard` -- every rank holds one of ``N`` equal, contiguous chunks of dim ``dim``.
  ``outer`` generalises this to a *strided* shard: dim ``dim`` of global size ``G`` is read
  as ``[outer, G // outer]`` and the chunks are taken along the second factor. This is what
  a view that merges ``(B, H)`` into ``B*H`` produces when ``H`` (heads) is sharded.
  ``blocks`` generalises it to unequal consecutive blocks (a fused ``[q | k | v]``
  projection): each block is split into ``N`` chunks and a rank holds its chunk of every
  block, in order.
* :class:`Partial` -- every rank holds a tensor of the full shape whose element-wise sum
  over the ranks is the true value (the output of a row-parallel matmul before all-reduce).

Converting ``Replicate -> Shard`` is free (a local slice), ``Partial -> Replicate`` costs an
all-reduce and ``Shard -> Replicate`` an all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Placement", "Replicate", "Shard", "Partial", "HeadGroup", "REPLICATE", "PARTIAL"]


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
    blocks: tuple | None = None  # unequal blocks (fused q/k/v), each split N ways

    def __post_init__(self):
        if self.blocks is not None:
            if len(set(self.blocks)) == 1:  # equal blocks are the strided shard `outer`
                object.__setattr__(self, "outer", len(self.blocks))
                object.__setattr__(self, "blocks", None)
            elif self.outer != 1:
                raise ValueError("a Shard has either outer or blocks")

    def moved(self, dim: int) -> "Shard":
        """The same split on another dim (after a permute, squeeze, broadcast...)."""
        return Shard(dim, self.outer, self.blocks)

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.blocks is None

    def block_sizes(self, size: int) -> tuple:
        """The consecutive blocks of a dim of global ``size``, each split ``N`` ways: the
        given ``blocks``, ``outer`` equal blocks, or the whole dim for a plain shard."""
        if self.blocks is not None:
            return tuple(self.blocks)
        return (size // self.outer,) * self.outer

    def __repr__(self) -> str:
        if self.blocks is not None:
            return f"S({self.dim},blocks={list(self.blocks)})"
        return f"S({self.dim})" if self.outer == 1 else f"S({self.dim},outer={self.outer})"


@dataclass(frozen=True)
class Partial(Placement):
    def __repr__(self) -> str:
        return "P"


@dataclass(frozen=True)
class HeadGroup(Placement):
    """Conversion target for the keys/values of grouped-query attention when the KV heads
    do not split across the ranks (vLLM's KV-head replication): dim ``dim`` holds
    ``kv_heads`` heads, each serving ``q_heads / kv_heads`` query heads; rank ``r`` keeps
    the single KV head its ``q_heads / N`` query heads use. Never a value's placement, only
    what a replicated operand is sliced to."""

    dim: int
    q_heads: int
    kv_heads: int

    def __repr__(self) -> str:
        return f"KV({self.dim},{self.kv_heads}->{self.q_heads})"

    def local_index(self, tp_rank: int, tp_size: int) -> int:
        group = self.q_heads // self.kv_heads
        return (tp_rank * (self.q_heads // tp_size)) // group


REPLICATE = Replicate()
PARTIAL = Partial()
