"""Differentiable redistributions: each collective paired with its conjugate in backward.

A graph compiled for training (grad mode on, an input that requires grad) is the same
local graph as for inference, with its redistributions swapped for the ops of this module.
Each is a ``torch.library`` custom op with a ``register_autograd`` formula, so AOTAutograd
traces the joint forward+backward graph through them and Inductor compiles both halves.

The gradient of a value is held in the *dual* of the value's placement: a ``Shard`` value's
gradient as the same shard of the true gradient, a ``Partial`` value's as the whole true
gradient on every rank, and a ``Replicate`` value's as the whole true gradient on every
rank. The conjugates keep that invariant (Megatron-LM's ``f``/``g`` pairs, Shoeybi et al.,
"Megatron-LM", 2019, section 3; PyTorch TP's ``PrepareModuleInput`` does the same with
DTensor redistributions):

===================  ==========================  =======================================
op                   forward                     backward
===================  ==========================  =======================================
``reduce``           all-reduce (Partial -> R)   identity (every partial term got ``g``)
``gather``           all-gather (Shard -> R)     this rank's chunk of ``g``
``scatter``          local chunk (R -> Shard)    all-gather of the chunks' gradients
``copy``             identity                    all-reduce
``reduce_scatter``   reduce-scatter (P -> Shard)  all-gather (sequence parallelism)
``gather_to_split``  all-gather (Shard -> R)     reduce-scatter of the ranks' shares
===================  ==========================  =======================================

``gather_to_split`` is ``gather`` then ``copy`` in one op, for a shard all-gathered only to
enter split ops (the token-split input of a column-parallel matmul under sequence
parallelism): its backward reduce-scatters the ranks' shares of the gradient instead of
all-reducing them and keeping a chunk (Megatron-LM's
``gather_from_sequence_parallel_region`` with ``tensor_parallel_output_grad``).

``copy`` goes on a replicated value where it enters an op whose output is split or partial
(a column-parallel matmul, an element-wise op with a split operand, the keys sliced for a
KV-head group): the local backward of such an op gives only this rank's share of the
replicated input's gradient, and the shares sum to the true one. An op whose operands and
output are all replicated gives the whole gradient locally and needs nothing.

Owns: the custom ops ``tp_backend::reduce``, ``gather``, ``scatter``, ``copy``,
``reduce_scatter``, ``gather_to_split`` and their autograd formulas. Must not: decide where
they go (:mod:`tp_backend.rewrite` does, from the solved placements) or implement the collectives (:mod:`tp_backend.collectives`).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import collectives, layers
from .placement import Shard

__all__ = ["reduce", "gather", "scatter", "copy", "reduce_scatter", "gather_to_split"]


def _fresh(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out``, copied if it shares ``x``'s storage (a custom op may not return an alias of
    its input)."""
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return out.clone()
    return out


@torch.library.custom_op("tp_backend::reduce", mutates_args=())
def reduce(x: torch.Tensor, group_name: str, use_shm: bool = False) -> torch.Tensor:
    """Partial -> Replicate: sum of ``x`` (any shape) over the group. Backward: identity."""
    return _fresh(collectives.all_reduce(x, group_name, use_shm), x)


@reduce.register_fake
def _(x, group_name, use_shm=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _reduce_backward(ctx, g):
    return g, None, None


reduce.register_autograd(_reduce_backward)


@torch.library.custom_op("tp_backend::copy", mutates_args=())
def copy(x: torch.Tensor, group_name: str, use_shm: bool = False) -> torch.Tensor:
    """A replicated value entering a split computation: identity (a copy). Backward: the
    all-reduce of the ranks' shares of the gradient."""
    return x.clone()


@copy.register_fake
def _(x, group_name, use_shm=False):
    return torch.empty_like(x)


def _copy_setup(ctx, inputs, output):
    ctx.group_name, ctx.use_shm = inputs[1], inputs[2]


def _copy_backward(ctx, g):
    return reduce(g, ctx.group_name, ctx.use_shm), None, None


copy.register_autograd(_copy_backward, setup_context=_copy_setup)


def _shard(dim: int, outer: int, blocks, units, counts=None) -> Shard:
    """The ``Shard`` the schema's arguments describe (``blocks`` and ``counts`` come as
    lists)."""
    return Shard(dim, outer, tuple(blocks) if blocks is not None else None, units,
                 tuple(counts) if counts is not None else None)


def _shard_setup(ctx, inputs, output):
    ctx.args = inputs[1:]  # gather and scatter take the same arguments after ``x``


@torch.library.custom_op("tp_backend::gather", mutates_args=())
def gather(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int, group_name: str,
           blocks: Optional[list[int]] = None, units: Optional[int] = None,
           use_shm: bool = False, counts: Optional[list[int]] = None) -> torch.Tensor:
    """Shard -> Replicate: :func:`tp_backend.collectives.all_gather` of ``x``. Backward:
    this rank's chunk of the gradient (:func:`scatter`)."""
    s = _shard(dim, outer, blocks, units, counts)
    return _fresh(collectives.all_gather(x, dim, outer, tp_size, group_name, s.blocks,
                                         tp_rank, use_shm, units, s.counts), x)


def _gathered_fake(x, dim, outer, tp_rank, tp_size, group_name, blocks=None, units=None,
                   use_shm=False, counts=None):
    """The fake of an op whose output is the whole of a shard ``x`` (gather,
    gather_to_split)."""
    shape = list(x.shape)
    shape[dim] = _shard(dim, outer, blocks, units, counts).global_size(shape[dim], tp_rank,
                                                                         tp_size)
    return x.new_empty(shape)


gather.register_fake(_gathered_fake)


def _gather_backward(ctx, g):
    return (scatter(g, *ctx.args), *([None] * len(ctx.args)))


gather.register_autograd(_gather_backward, setup_context=_shard_setup)


@torch.library.custom_op("tp_backend::scatter", mutates_args=())
def scatter(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int,
            group_name: str, blocks: Optional[list[int]] = None, units: Optional[int] = None,
            use_shm: bool = False, counts: Optional[list[int]] = None) -> torch.Tensor:
    """Replicate -> Shard: this rank's chunk of ``x`` (no communication). Backward: the
    all-gather of the ranks' chunk gradients (:func:`gather`)."""
    s = _shard(dim, outer, blocks, units, counts)
    return _fresh(layers.local_shard(x, dim, outer, tp_rank, tp_size, s.blocks, units,
                                     s.counts), x)


def _chunk_fake(x, dim, outer, tp_rank, tp_size, group_name, blocks=None, units=None,
                use_shm=False, counts=None):
    """The fake of an op whose output is this rank's shard of ``x`` (scatter,
    reduce_scatter)."""
    shape = list(x.shape)
    shape[dim] = _shard(dim, outer, blocks, units, counts).local_size(shape[dim], tp_rank,
                                                                        tp_size)
    return x.new_empty(shape)


scatter.register_fake(_chunk_fake)


def _scatter_backward(ctx, g):
    return (gather(g, *ctx.args), *([None] * len(ctx.args)))


scatter.register_autograd(_scatter_backward, setup_context=_shard_setup)


@torch.library.custom_op("tp_backend::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int,
                   group_name: str, blocks: Optional[list[int]] = None,
                   units: Optional[int] = None, use_shm: bool = False,
                   counts: Optional[list[int]] = None) -> torch.Tensor:
    """Partial -> Shard: :func:`tp_backend.collectives.reduce_scatter` of ``x`` (Megatron's
    sequence-parallel reduce-scatter after a row-parallel layer). Backward: the all-gather
    of the chunks' gradients (every partial term got the whole gradient)."""
    s = _shard(dim, outer, blocks, units, counts)
    return _fresh(collectives.reduce_scatter(x, dim, outer, tp_rank, tp_size, group_name,
                                             s.blocks, units, use_shm, s.counts), x)


reduce_scatter.register_fake(_chunk_fake)
reduce_scatter.register_autograd(_scatter_backward, setup_context=_shard_setup)


@torch.library.custom_op("tp_backend::gather_to_split", mutates_args=())
def gather_to_split(x: torch.Tensor, dim: int, outer: int, tp_rank: int, tp_size: int,
                    group_name: str, blocks: Optional[list[int]] = None,
                    units: Optional[int] = None, use_shm: bool = False,
                    counts: Optional[list[int]] = None) -> torch.Tensor:
    """Shard -> Replicate for split consumers only: :func:`gather`'s forward. Backward:
    the reduce-scatter of the ranks' shares of the gradient (:func:`reduce_scatter`)."""
    return gather(x, dim, outer, tp_rank, tp_size, group_name, blocks, units, use_shm, counts)


gather_to_split.register_fake(_gathered_fake)


def _gather_to_split_backward(ctx, g):
    return (reduce_scatter(g, *ctx.args), *([None] * len(ctx.args)))


gather_to_split.register_autograd(_gather_to_split_backward, setup_context=_shard_setup)

# The overloads the rewrite puts in graphs (a graph calls an op, not the Python definition).
REDUCE = torch.ops.tp_backend.reduce.default
COPY = torch.ops.tp_backend.copy.default
GATHER = torch.ops.tp_backend.gather.default
SCATTER = torch.ops.tp_backend.scatter.default
REDUCE_SCATTER = torch.ops.tp_backend.reduce_scatter.default
GATHER_TO_SPLIT = torch.ops.tp_backend.gather_to_split.default
