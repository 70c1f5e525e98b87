"""Parallel layers, as functions the rewrite inserts into the ATen graph.

Megatron-LM (Shoeybi et al., arXiv:1909.08053, section 3) and the reference design
(Optimum's ``ColumnParallelLinear``/``RowParallelLinear``/``VocabParallelEmbedding``).
Today's Dynamo graphs hold parameters as placeholders and linears as ``mm``/``addmm`` on
them, so a layer is a function of local tensors, not a module with weights:

* column-parallel linear: ``mm(x, W_local.t())`` with ``W: [out, in]`` split on dim 0 --
  the plain ``mm`` on the local shard already is the layer; its output ``[M, out/N]`` is
  split on the last dim (see :mod:`tp_backend.rules.matmul`).
* row-parallel linear -- ``W`` split on ``in``: :func:`partial_product`, an all-reduce
  (:mod:`tp_backend.collectives`, or its differentiable conjugate when training), then
  :func:`add_bias` once; the rewrite inserts the three as separate nodes.
* :func:`vocab_parallel_embedding` -- the table ``[V, E]`` split on ``V``; in an inference
  graph :func:`vocab_parallel_embedding_of_rank`, which reads this process's rank when it
  runs (:func:`register_rank`), so the local graphs of the ranks are the same graph and one
  compile serves every rank of a host (:mod:`tp_backend.downstream`).
* :func:`local_shard` -- this rank's chunk of a replicated value (no communication).

Owns: the functions the local graphs call for parallel layers and local slices:
:func:`partial_product` and :func:`add_bias` (the row-parallel linear's local parts),
:func:`vocab_parallel_embedding` (and the rank each process holds in a group, for
:func:`vocab_parallel_embedding_of_rank`), :func:`local_shard`, :func:`shard_ranges` and
:func:`kv_head_slice`. Must not: decide placements (:mod:`tp_backend.rules` and the solver
do) or where a layer goes (:mod:`tp_backend.rewrite` inserts the calls), or implement a
collective (:mod:`tp_backend.collectives`).
"""

from __future__ import annotations

import torch

from .dispatch import plain_op
from .placement import Shard

__all__ = ["partial_product", "add_bias", "vocab_parallel_embedding",
           "vocab_parallel_embedding_of_rank", "register_rank", "local_shard", "kv_head_slice"]

aten = torch.ops.aten


def partial_product(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """This rank's addend of a row-parallel product: ``x: [M, K/N] @ w_t: [K/N, out]``, or
    the batched ``[B, M, K/N] @ [B, K/N, out]`` (``baddbmm``)."""
    return aten.bmm(x, w_t) if x.dim() == 3 else aten.mm(x, w_t)


def add_bias(product: torch.Tensor, bias: torch.Tensor, beta=1, alpha=1) -> torch.Tensor:
    """``beta * bias + alpha * product``, ``addmm``'s and ``baddbmm``'s scaling."""
    if alpha != 1:
        product = aten.mul(product, alpha)
    if beta != 1:
        bias = aten.mul(bias, beta)
    return aten.add(product, bias)


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, vocab_start: int,
                             vocab_end: int, padding_idx: int = -1) -> torch.Tensor:
    """Look up ``ids: [*]`` in this rank's rows ``[vocab_start, vocab_end)`` of the table
    (``weight: [V/N, E]``); ids owned by other ranks give zeros. The result ``[*, E]`` is a
    partial sum: all-reduced over the ranks it equals ``embedding(W, ids)``.
    ``padding_idx`` (a global row, -1 for none; its row gets no gradient) becomes this
    rank's local row where it holds it."""
    outside = (ids < vocab_start) | (ids >= vocab_end)
    local = aten.masked_fill(ids - vocab_start, outside, 0)
    local_pad = padding_idx - vocab_start if vocab_start <= padding_idx < vocab_end else -1
    out = aten.embedding(weight, local, local_pad)
    return aten.masked_fill(out, outside.unsqueeze(-1), 0)


# group name -> this process's rank in the group (set by the backend before it compiles for
# the group; read by the kernel of tp_backend::vocab_shard_ids when a graph runs).
_RANKS: dict[str, int] = {}


def register_rank(group_name: str, tp_rank: int) -> None:
    """Record that this process is rank ``tp_rank`` of the group ``group_name`` (the
    functional collectives' name of ``tp_group``), for graphs that read their rank when they
    run."""
    _RANKS[group_name] = tp_rank


def _vocab_shard_ids(ids: torch.Tensor, rows: int,
                     group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's local row of each id (``ids: [*]`` int64), with rows ``[r * rows, (r + 1)
    * rows)`` held by rank ``r`` of ``group_name``, and where the id lies outside them
    (``[*]`` bool; those ids get row 0). The rank is read when the op runs, not traced."""
    start = _RANKS[group_name] * rows
    outside = (ids < start) | (ids >= start + rows)
    return (ids - start).masked_fill_(outside, 0), outside


def _vocab_shard_ids_fake(ids, rows, group_name):
    return torch.empty_like(ids), torch.empty_like(ids, dtype=torch.bool)


# ``tp_backend::vocab_shard_ids(Tensor ids, int rows, str group_name) -> (Tensor, Tensor)``.
vocab_shard_ids = plain_op("tp_backend::vocab_shard_ids", _vocab_shard_ids,
                           _vocab_shard_ids_fake)


def vocab_parallel_embedding_of_rank(weight: torch.Tensor, ids: torch.Tensor, rows: int,
                                     group_name: str) -> torch.Tensor:
    """:func:`vocab_parallel_embedding` for rank ``r`` of ``group_name`` holding the table's
    rows ``[r * rows, (r + 1) * rows)`` (``weight: [rows, E]``), with ``r`` read when the
    graph runs (:func:`register_rank`): the traced graph is the same on every rank. Without
    ``padding_idx``, which only changes the gradient (inference graphs, or tables without
    one)."""
    local, outside = vocab_shard_ids(ids, rows, group_name)
    out = aten.embedding(weight, local)
    return aten.masked_fill(out, outside.unsqueeze(-1), 0)


def shard_ranges(size: int, outer: int, tp_rank: int, tp_size: int,
                 blocks: tuple | None = None, units: int | None = None,
                 counts: tuple | None = None) -> list[tuple[int, int]]:
    """``(start, length)`` ranges of a dim of global ``size`` that rank ``tp_rank`` holds
    under ``Shard(dim, outer, blocks, units, counts)``, in local order."""
    return Shard(0, outer, blocks, units, counts).ranges(size, tp_rank, tp_size)


def local_shard(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int,
                blocks: tuple | None = None, units: int | None = None,
                counts: tuple | None = None) -> torch.Tensor:
    """Chunk ``tp_rank`` of ``tp_size`` of dim ``dim`` of a replicated ``x`` under
    ``Shard(dim, outer, blocks, units, counts)`` (see :mod:`tp_backend.placement`), as a
    contiguous tensor."""
    ranges = shard_ranges(x.shape[dim], outer, tp_rank, tp_size, blocks, units, counts)
    if len(ranges) == 1:
        start, step = ranges[0]
        return x.narrow(dim, start, step).contiguous()
    return torch.cat([x.narrow(dim, start, step) for start, step in ranges], dim=dim)


def kv_head_slice(x: torch.Tensor, dim: int, heads: tuple) -> torch.Tensor:
    """The KV heads (``x: [B, Hkv, S, D]`` -> ``[B, len(heads), S, D]``) that this rank's
    query heads attend with (see :class:`~tp_backend.placement.HeadGroup`): a run of
    consecutive heads is a slice; a head repeated for several query heads is expanded
    ``repeat_kv``-style, one run at a time."""
    if list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return x.narrow(dim, heads[0], len(heads)).contiguous()
    runs = []  # [head, repeats]
    for h in heads:
        if runs and runs[-1][0] == h:
            runs[-1][1] += 1
        else:
            runs.append([h, 1])
    parts = []
    for h, count in runs:
        one = x.narrow(dim, h, 1)
        shape = list(one.shape)
        shape[dim] = count
        parts.append(one.expand(shape))
    return torch.cat(parts, dim=dim)
