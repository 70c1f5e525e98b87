"""Parallel layers, as functions the rewrite inserts into the ATen graph.

Megatron-LM (Shoeybi et al., arXiv:1909.08053, section 3) and the reference design
(Optimum's ``ColumnParallelLinear``/``RowParallelLinear``/``VocabParallelEmbedding``).
Today's Dynamo graphs hold parameters as placeholders and linears as ``mm``/``addmm`` on
them, so a layer is a function of local tensors, not a module with weights:

* column-parallel linear: ``mm(x, W_local.t())`` with ``W: [out, in]`` split on dim 0 --
  the plain ``mm`` on the local shard already is the layer; its output ``[M, out/N]`` is
  split on the last dim (see :mod:`tp_backend.rules.matmul`).
* :func:`row_parallel_linear` -- ``W`` split on ``in``: local product, all-reduce, bias once.
* :func:`vocab_parallel_embedding` -- the table ``[V, E]`` split on ``V``.
* :func:`local_shard` -- this rank's chunk of a replicated value (no communication).
"""

from __future__ import annotations

import torch

from .collectives import all_reduce

__all__ = ["row_parallel_linear", "vocab_parallel_embedding", "local_shard"]

aten = torch.ops.aten


def row_parallel_linear(bias: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor,
                        group_name: str) -> torch.Tensor:
    """``x @ w_t + bias`` where ``x: [M, K/N]`` and ``w_t: [K/N, out]`` hold this rank's
    slice of the contraction dim; the partial products are all-reduced, then the bias
    ``[out]`` (replicated) is added once."""
    return aten.add(all_reduce(aten.mm(x, w_t), group_name), bias)


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, vocab_start: int,
                             vocab_end: int) -> torch.Tensor:
    """Look up ``ids: [*]`` in this rank's rows ``[vocab_start, vocab_end)`` of the table
    (``weight: [V/N, E]``); ids owned by other ranks give zeros. The result ``[*, E]`` is a
    partial sum: all-reduced over the ranks it equals ``embedding(W, ids)``."""
    outside = (ids < vocab_start) | (ids >= vocab_end)
    local = aten.masked_fill(ids - vocab_start, outside, 0)
    out = aten.embedding(weight, local)
    return aten.masked_fill(out, outside.unsqueeze(-1), 0)


def local_shard(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Chunk ``tp_rank`` of ``tp_size`` of dim ``dim`` of a replicated ``x`` (read as
    ``[outer, size/outer]`` and split on the second factor), as a contiguous tensor."""
    size = x.shape[dim]
    if outer == 1:
        step = size // tp_size
        return x.narrow(dim, tp_rank * step, step).contiguous()
    inner = size // outer
    step = inner // tp_size
    shape = list(x.shape)
    y = x.reshape(shape[:dim] + [outer, inner] + shape[dim + 1:])
    y = y.narrow(dim + 1, tp_rank * step, step)
    return y.reshape(shape[:dim] + [outer * step] + shape[dim + 1:]).contiguous()
