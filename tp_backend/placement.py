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
  ``units`` makes the split uneven (heads that ``N`` does not divide, 9 heads at TP=2):
  every block is read as ``units`` equal units (heads, or single features) and rank ``r``
  holds a consecutive run of them, dealt as :func:`torch.tensor_split` deals ``units``
  items into ``N`` parts (the first ``units % N`` ranks one more: 9 heads -> 5 + 4). Local
  sizes then differ by rank; the rules that change shapes ask :meth:`Shard.local_size`.
  ``counts`` (with ``units``) deals them by weight instead: rank ``r`` holds ``counts[r]``
  consecutive units (the solver's work balance gives a rank with more attention heads
  fewer MLP features, see :mod:`tp_backend.balance`).
* :class:`Partial` -- every rank holds a tensor of the full shape whose element-wise sum
  over the ranks is the true value (the output of a row-parallel matmul before all-reduce).

Converting ``Replicate -> Shard`` is free (a local slice), ``Partial -> Replicate`` costs an
all-reduce, ``Partial -> Shard`` a reduce-scatter and ``Shard -> Replicate`` an all-gather
(:class:`Collective`).

Owns: the placement types (:class:`Replicate`, :class:`Shard`, :class:`Partial`,
:class:`HeadGroup`), a shard's arithmetic (``ranges``, ``local_size``, ``global_size``,
``splits``, ``block_sizes``), :class:`Collective` and :class:`StrEnum`. Must not: choose a
value's placement (:mod:`tp_backend.rules` and :mod:`tp_backend.solver`) or move data
(:mod:`tp_backend.collectives`, :mod:`tp_backend.layers`); it imports no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Placement", "Replicate", "Shard", "Partial", "HeadGroup", "REPLICATE", "PARTIAL",
           "StrEnum", "Collective"]


class StrEnum(str, enum.Enum):
    """An enum whose members are strings (``enum.StrEnum`` of Python 3.11, here for 3.10):
    a member equals, prints and serialises (JSON, the plan) as its value."""

    __str__ = str.__str__
    __format__ = str.__format__


class Collective(StrEnum):
    """The collective a conversion away from a placement costs: ``Partial -> Replicate`` an
    all-reduce, ``Partial -> Shard`` a reduce-scatter (sequence parallelism), ``Shard -> *``
    an all-gather (a slice after it is free)."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"


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
    outer: int = 1  # a strided shard: the dim read as [outer, G // outer], split inside
    blocks: tuple | None = None  # unequal blocks (fused q/k/v), each split N ways
    units: int | None = None  # uneven split: each block is this many units, dealt out
    counts: tuple | None = None  # (with units) units per rank, where not the even deal

    def __post_init__(self):
        if self.counts is not None:
            counts = tuple(int(c) for c in self.counts)
            if self.units is None or sum(counts) != self.units or min(counts) < 1:
                raise ValueError(f"Shard counts {counts} must deal all {self.units} units, "
                                 "at least one per rank")
            even = list(_deal(self.units, len(counts)))
            object.__setattr__(self, "counts", None if list(counts) == even else counts)
        if self.blocks is not None:
            if len(set(self.blocks)) == 1:  # equal blocks are the strided shard `outer`
                object.__setattr__(self, "outer", len(self.blocks))
                object.__setattr__(self, "blocks", None)
            elif self.outer != 1:
                raise ValueError("a Shard has either outer or blocks")
            elif self.units is not None:
                raise ValueError("an uneven Shard has no unequal blocks")

    def moved(self, dim: int) -> "Shard":
        """The same split on another dim (after a permute, squeeze, broadcast...)."""
        return Shard(dim, self.outer, self.blocks, self.units, self.counts)

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.blocks is None and self.units is None

    def unit_counts(self, tp_size: int) -> list:
        """Units per rank of every block under an uneven split: ``counts``, else as
        :func:`torch.tensor_split` deals ``units`` items into ``tp_size`` parts."""
        if self.counts is not None:
            if len(self.counts) != tp_size:
                raise ValueError(f"{self!r} deals its units to {len(self.counts)} ranks, "
                                 f"not {tp_size}")
            return list(self.counts)
        return _deal(self.units, tp_size)

    def ranges(self, size: int, tp_rank: int, tp_size: int) -> list:
        """``(start, length)`` ranges of a dim of global ``size`` that rank ``tp_rank``
        holds, in local order (one per block)."""
        out, off = [], 0
        for b in self.block_sizes(size):
            if self.units is None:
                step = b // tp_size
                out.append((off + tp_rank * step, step))
            else:
                unit = b // self.units
                counts = self.unit_counts(tp_size)
                out.append((off + sum(counts[:tp_rank]) * unit, counts[tp_rank] * unit))
            off += b
        return out

    def local_size(self, size: int, tp_rank: int, tp_size: int) -> int:
        """Size on rank ``tp_rank`` of a sharded dim of global ``size``."""
        if self.units is None:
            return size // tp_size
        return size // self.units * self.unit_counts(tp_size)[tp_rank]

    def global_size(self, local: int, tp_rank: int, tp_size: int) -> int:
        """The global size of a dim whose local size on rank ``tp_rank`` is ``local`` (the
        inverse of :meth:`local_size`)."""
        if self.units is None:
            return local * tp_size
        return local // self.unit_counts(tp_size)[tp_rank] * self.units

    def splits(self, size: int, tp_size: int) -> bool:
        """Whether every block of a dim of global ``size`` splits as the placement says:
        ``tp_size`` equal chunks, or (uneven) at least one whole unit per rank."""
        blocks = self.block_sizes(size)
        if self.units is None:
            return all(b >= tp_size and b % tp_size == 0 for b in blocks)
        return self.units >= tp_size and all(b % self.units == 0 for b in blocks)

    def block_sizes(self, size: int) -> tuple:
        """The consecutive blocks of a dim of global ``size``, each split ``N`` ways: the
        given ``blocks``, ``outer`` equal blocks, or the whole dim for a plain shard."""
        if self.blocks is not None:
            return tuple(self.blocks)
        return (size // self.outer,) * self.outer

    def __repr__(self) -> str:
        if self.blocks is not None:
            return f"S({self.dim},blocks={list(self.blocks)})"
        extra = "" if self.outer == 1 else f",outer={self.outer}"
        if self.units is not None:
            extra += f",units={self.units}"
        if self.counts is not None:
            extra += f",counts={list(self.counts)}"
        return f"S({self.dim}{extra})"


def _deal(units: int, tp_size: int) -> list:
    """``units`` items dealt into ``tp_size`` consecutive runs as
    :func:`torch.tensor_split` deals them (the first ``units % tp_size`` runs one more)."""
    q, r = divmod(units, tp_size)
    return [q + (k < r) for k in range(tp_size)]


@dataclass(frozen=True)
class Partial(Placement):
    def __repr__(self) -> str:
        return "P"


@dataclass(frozen=True)
class HeadGroup(Placement):
    """Conversion target for the keys/values of grouped-query attention when the KV heads
    do not split with the query heads (fewer KV heads than ranks, as vLLM replicates them,
    or query heads split unevenly): dim ``dim`` holds ``kv_heads`` heads, each serving
    ``q_heads / kv_heads`` query heads; the rank keeps the KV heads its query heads use
    (split as ``Shard(dim, units=q_units)``). Never a value's placement, only what a
    replicated operand is sliced to."""

    dim: int
    q_heads: int
    kv_heads: int
    q_units: int | None = None

    def __repr__(self) -> str:
        return f"KV({self.dim},{self.kv_heads}->{self.q_heads})"

    def local_heads(self, tp_rank: int, tp_size: int) -> tuple:
        """The KV heads rank ``tp_rank`` keeps, in order: one per group of its query heads
        when they come in whole groups (the local attention stays grouped), else one per
        query head (the keys repeated as ``repeat_kv`` would)."""
        (start, length), = Shard(self.dim, units=self.q_units).ranges(self.q_heads, tp_rank,
                                                                       tp_size)
        group = self.q_heads // self.kv_heads
        per_q = [(start + i) // group for i in range(length)]
        if len(set(per_q)) == 1:
            return (per_q[0],)
        if start % group == 0 and length % group == 0:
            return tuple(range(start // group, (start + length) // group))
        return tuple(per_q)


REPLICATE = Replicate()
PARTIAL = Partial()
