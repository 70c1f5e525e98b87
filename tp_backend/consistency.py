"""Ranks that agree: the random state and the inputs of the tensor-parallel ranks.

Every rank of a TP group runs the same program on the same inputs; the all-reduces inside
the graphs sum pieces of *one* computation. Two things break that silently in ordinary
user code, and this module guards both (issue 14):

* **Random state.** A torchrun script that seeds per rank (or not at all) samples different
  tokens on each rank (``generate(do_sample=True)`` runs ``torch.multinomial`` outside the
  graph), and the next step's all-reduces mix two different sequences.
  :func:`sync_rng_state` gives every rank the random state of the group's first rank (CPU
  generator, and the current CUDA device's when CUDA is in use): afterwards the ranks draw
  the same numbers, so they sample what one process seeded like rank 0 would.
* **Inputs.** :func:`check_inputs_agree` compares a checksum of every non-parameter input
  across the group (one all-gather of ``[n_inputs, 3]`` float64 values) and raises
  :class:`~tp_backend.errors.TPInputMismatchError` on every rank, naming the inputs and the
  ranks that differ.

Both are collectives: every rank must call them, in the same order (the runner does, on a
compiled graph's first call by default; see the ``sync_rng`` and ``check_inputs`` options).

Owns: the ranks' agreement outside the graphs: :func:`sync_rng_state`,
:func:`check_inputs_agree` (with :func:`checksum`) and :func:`any_rank`. Must not: decide
when they run (the runner of :mod:`tp_backend.backend`, per the options
:mod:`tp_backend.options` validates), or provide the collectives inside the graphs
(:mod:`tp_backend.collectives`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import TPInputMismatchError

__all__ = ["sync_rng_state", "check_inputs_agree", "checksum", "any_rank", "collective_device"]


def collective_device(group) -> torch.device:
    """Where this group's collectives take tensors: CUDA for NCCL, else CPU (gloo)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_state(state: torch.Tensor, group, device) -> torch.Tensor:
    t = state.to(device)
    dist.broadcast(t, dist.get_global_rank(group, 0), group=group)
    return t.cpu()


def sync_rng_state(group) -> None:
    """Set this rank's default random generators to the state of ``group``'s first rank:
    the CPU generator, and the current CUDA device's if CUDA has been initialised. A
    collective (a broadcast of each state, ~5 KB for the CPU one)."""
    device = collective_device(group)
    torch.set_rng_state(_broadcast_state(torch.get_rng_state(), group, device))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(_broadcast_state(torch.cuda.get_rng_state(), group, device))


def checksum(x) -> torch.Tensor:
    """``[sum, position-weighted sum, numel]`` of a tensor (float64, on CPU), or
    ``[v, v, 1]`` of a number: equal on two ranks when their inputs are (the weights
    ``1 + i mod 1009`` catch reordered values, ``numel`` different shapes)."""
    if not isinstance(x, torch.Tensor):
        v = float(x)
        return torch.tensor([v, v, 1.0], dtype=torch.float64)
    flat = x.detach().reshape(-1).to(torch.float64)
    w = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(1009).add_(1)
    return torch.stack([flat.sum(), (flat * w).sum(),
                        torch.tensor(float(flat.numel()), dtype=torch.float64,
                                     device=flat.device)]).cpu()


def check_inputs_agree(inputs: list, group) -> None:
    """Raise on every rank if the ranks of ``group`` were given different inputs.

    Args:
        inputs: ``[(label, tensor or number)]``, the same labels in the same order on
            every rank (a compiled graph's non-parameter inputs).
        group: the tensor-parallel process group.

    Raises:
        TPInputMismatchError: some input differs; the message names each differing input
            and which ranks hold which value.
    """
    if not inputs:
        return
    device = collective_device(group)
    local = torch.stack([checksum(v) for _, v in inputs]).to(device)  # [n, 3]
    n_ranks = dist.get_world_size(group)
    gathered = torch.empty((n_ranks * local.shape[0], 3), dtype=local.dtype, device=device)
    # The ranks' rows, concatenated (all_gather_single is torch 2.13's name for
    # all_gather_into_tensor, which older torch has alone).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    gathered = gathered.cpu().view(n_ranks, -1, 3)
    bad = []
    for i, (label, _) in enumerate(inputs):
        classes: list[list[int]] = []
        for r in range(n_ranks):
            for c in classes:
                if torch.equal(gathered[c[0], i].nan_to_num(-1.5), gathered[r, i].nan_to_num(-1.5)):
                    c.append(r)
                    break
            else:
                classes.append([r])
        if len(classes) > 1:
            bad.append(f"{label!r} (ranks " + " vs ".join(str(c) for c in classes) + ")")
    if bad:
        raise TPInputMismatchError(
            f"the tensor-parallel ranks were called with different inputs: {', '.join(bad)}. "
            "Every rank of the tp_group must run the model on the same inputs (token ids, "
            "attention mask, positions) -- the ranks compute pieces of one result. When "
            "sampling, the ranks must also share their random state: tp_auto synchronises it "
            "from the group's first rank (option sync_rng), unless something reseeds the "
            "ranks differently afterwards.")


def any_rank(flag: bool, group) -> bool:
    """Whether ``flag`` is true on any rank of ``group`` (an all-reduce of one integer), so
    every rank takes the same branch."""
    t = torch.tensor([int(flag)], device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
