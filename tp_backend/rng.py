"""Random numbers for split activations: independent per rank, without moving the shared
random stream.

``sync_rng`` (:mod:`tp_backend.consistency`) starts every rank's default generator in the
same state, so a random op on a replicated activation (a dropout on the residual stream)
draws the same mask on every rank, as it must. A random op on a split activation (dropout
on attention probabilities split over heads, on a column-parallel MLP's hidden values)
would draw the same pattern on every rank's shard, and, with an uneven split, a different
number of values per rank, after which the ranks' streams -- and their replicated masks
-- would no longer agree. Megatron-LM keeps a separate model-parallel random state for
split regions (its ``CudaRNGStatesTracker``, seeded ``seed + 2718 + tp_rank``); here each
such op draws one seed from the shared stream (the same draw on every rank, whatever the
split) and its values from a generator seeded by that seed and the rank.

Owns: the custom op ``tp_backend::rank_rand_like`` and :func:`keep_mask` (the attention
leaf's dropout mask). Must not: decide which ops get them (:mod:`tp_backend.rewrite` and
:mod:`tp_backend.decompose` do).
"""

from __future__ import annotations

import torch

__all__ = ["rank_rand_like", "keep_mask", "draw_seed"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, rank) over the seed space


def _generator(seed: torch.Tensor, rank: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed.item()) ^ (rank * _MIX)) & ((1 << 63) - 1))
    return g


def draw_seed(device) -> torch.Tensor:
    """One int64 seed (0-dim) from the default generator: a graph op, so every rank draws
    it at the same point of its stream."""
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64, device=device)


@torch.library.custom_op("tp_backend::rank_rand_like", mutates_args=())
def rank_rand_like(x: torch.Tensor, seed: torch.Tensor, rank: int) -> torch.Tensor:
    """``torch.rand_like(x)`` (uniform on [0, 1), ``x``'s shape, dtype and device) from a
    generator seeded by ``seed`` (a 0-dim int64 tensor) and ``rank``: independent values
    per rank, and no draw from the default generator."""
    return torch.rand(x.shape, dtype=x.dtype, device=x.device,
                      generator=_generator(seed, rank, x.device))


@rank_rand_like.register_fake
def _(x, seed, rank):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def keep_mask(shape, p: float, seed: torch.Tensor, rank: int, device) -> torch.Tensor:
    """The dropout keep mask (``True`` with probability ``1 - p``) of ``shape``, drawn as
    :func:`rank_rand_like` draws: the same ``(seed, rank)`` gives the same mask, so
    backward regenerates it instead of saving it."""
    u = torch.rand(tuple(shape), device=device, generator=_generator(seed, rank, device))
    return u >= p
