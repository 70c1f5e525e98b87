"""Validation of the ``options`` dict of ``torch.compile(..., backend="tp_auto", options=...)``.

All checks live here; the backend receives a :class:`TPOptions`.

Owns: the option names and their help (``OPTION_DOCS``), their defaults, the checks of
:func:`validate_options` (the default process group included) and :class:`TPOptions`.
Must not: act on an option (the backend, :mod:`tp_backend.consistency`,
:mod:`tp_backend.shm` and :mod:`tp_backend.cpu_matmul` do), list the kernels itself
(``CPU_MATMUL_KERNELS`` and ``ALL_REDUCE_CHOICES`` come from those two), or decide whether
the shared-memory kernel can serve a group (:mod:`tp_backend.shm`, at set-up).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch._inductor
import torch.distributed as dist

from .cpu_matmul import CPU_MATMUL_KERNELS
from .shm import ALL_REDUCE_CHOICES
from .errors import TPOptionsError, TPOptionsTypeError, TPProcessGroupError

__all__ = ["TPOptions", "validate_options", "OPTION_DOCS"]

OPTION_DOCS = {
    "tp_group": "torch.distributed.ProcessGroup of the tensor-parallel ranks "
                "(default: the default group, if torch.distributed is initialised)",
    "compiler": "downstream compiler of each rank's rewritten graph: 'inductor' (default) or "
                "'eager' (run the graph as it is, for debugging)",
    "mode": "Inductor's compile mode for each rank's local graph, as torch.compile's mode= "
            "for backend='inductor': 'default', 'reduce-overhead' (CUDA graphs on GPUs; "
            "parameter shards and state stored split are static inputs, not copied per "
            "call), 'max-autotune', 'max-autotune-no-cudagraphs', 'lite' (the keys of "
            "torch._inductor.list_mode_options()); needs compiler='inductor'",
    "cpu_matmul": "kernel of float32 matmuls on CPU in the Inductor-compiled graph: 'onednn' "
                  "(default) or 'aten' (ATen's choice, MKL: exactly what backend='inductor' "
                  "runs); see tp_backend.cpu_matmul",
    "sync_rng": "when every rank's random state is set to the tp_group's first rank's, so "
                "sampling agrees across ranks: 'first' (default: on each compiled graph's "
                "first call), 'always' (every call) or 'off'",
    "check_inputs": "when the ranks' inputs are compared (one small all-gather of checksums; "
                    "different inputs raise TPInputMismatchError on every rank): 'first' "
                    "(default: each compiled graph's first call), 'always' or 'off'",
    "all_reduce": "what sums the all-reduces: 'auto' (default: DeepSpeed's same-host "
                  "shared-memory kernel where every rank of the world is in tp_group on one "
                  "host, with gloo and CPU float tensors, and deepspeed is installed; else the "
                  "group's backend), 'shm' (require the kernel: TPOptionsError where it "
                  "cannot serve) or 'group' (the group's backend); see tp_backend.shm",
    "fallback": "what a graph whose decomposition, solve or rewrite fails does: 'replicate' "
                "(default: it runs unsplit, parameters whole, with one warning) or 'raise'",
    "outputs": "how a graph returns an output it computed split evenly on one dim (the logits "
               "of a column-parallel LM head): 'auto' (default: split where a graph compiled "
               "for training computes its own vocab-parallel loss, i.e. a forward with "
               "labels, so the logits returned beside that loss never exist whole; gathered "
               "everywhere else), 'gather' (always all-gathered whole) or 'split' (always a "
               "tp_backend.TPTensor holding this rank's shard; tp_backend.full_tensor(t) "
               "gathers one, a collective every rank calls)",
    "sequence_parallel": "True: Megatron's sequence parallelism (default False): the norms, "
                         "residual adds and dropout between a row-parallel output and the "
                         "next column-parallel input run split over the tokens, each "
                         "all-reduce becoming a reduce-scatter plus an all-gather (same "
                         "bytes, 1/N of those activations per rank); graphs with fewer "
                         "tokens than ranks (decode) all-reduce as without it",
    "lm_head": "where the LM head (the projection to the logits) lives: 'split' (default: "
               "vocab-parallel, 1/N of it per rank, the logits all-gathered) or 'replicate' "
               "(whole on every rank, with its tied embedding: no logits all-gather and no "
               "embedding all-reduce, for N times its matmul and (N-1)/N of its bytes more "
               "per rank)",
    "balance": "whether an uneven split (attention heads that tp_size does not divide) is "
               "evened out: 'off' (default: even splits; KV heads kept whole beside "
               "unevenly split queries) or 'work' (the MLP's evenly split projections are "
               "dealt by weight so that every rank's modelled FLOPs match, and query heads "
               "are dealt in whole KV groups where that, balanced, costs less, each rank then "
               "computing and caching only its own KV heads); the plan says what it chose; "
               "see tp_backend.balance",
}
_COMPILERS = ("eager", "inductor")
_FALLBACKS = ("replicate", "raise")
_WHEN = ("first", "always", "off")
_OUTPUTS = ("auto", "gather", "split")
LM_HEAD_CHOICES = ("split", "replicate")
BALANCE_CHOICES = ("off", "work")


@dataclass(frozen=True)
class TPOptions:
    """Validated options.

    Attributes:
        tp_group: the tensor-parallel process group.
        tp_rank: this process's rank in ``tp_group``.
        tp_size: number of ranks in ``tp_group`` (``N``).
        compiler: what runs the rewritten graph.
        mode: Inductor's compile mode (a key of ``torch._inductor.list_mode_options()``).
        cpu_matmul: which kernel computes float32 CPU matmuls under Inductor
            (:mod:`tp_backend.cpu_matmul`).
        sync_rng / check_inputs: ``"first"``, ``"always"`` or ``"off"``
            (:mod:`tp_backend.consistency`).
        all_reduce: ``"auto"``, ``"shm"`` or ``"group"`` (:mod:`tp_backend.shm`).
        fallback: ``"replicate"`` or ``"raise"``: a graph whose pass fails runs unsplit or
            raises :class:`~tp_backend.errors.TPPassError`.
        outputs: ``"auto"``, ``"gather"`` or ``"split"``: whether outputs computed split
            are all-gathered or returned as :class:`~tp_backend.tp_tensor.TPTensor` (``auto``:
            split beside a vocab-parallel loss in a training graph).
        sequence_parallel: split the regions between row- and column-parallel layers over
            the tokens (:func:`tp_backend.solver.solve`).
        lm_head: ``"split"`` or ``"replicate"``: the LM head vocab-parallel or whole on every
            rank (:func:`tp_backend.solver.solve`).
        balance: ``"work"`` or ``"off"``: whether uneven splits are evened out by weighted
            deals (:func:`tp_backend.solver.solve`, :mod:`tp_backend.balance`).
    """

    tp_group: Any
    tp_rank: int
    tp_size: int
    compiler: str = "inductor"
    mode: str = "default"
    cpu_matmul: str = "onednn"
    sync_rng: str = "first"
    check_inputs: str = "first"
    fallback: str = "replicate"
    all_reduce: str = "auto"
    outputs: str = "auto"
    sequence_parallel: bool = False
    lm_head: str = "split"
    balance: str = "off"

    @property
    def group_name(self) -> str:
        return self.tp_group.group_name


# The options chosen from a fixed set of values, and their defaults (TPOptions' own).
_CHOICES = {"compiler": _COMPILERS, "mode": tuple(torch._inductor.list_mode_options()),
            "cpu_matmul": CPU_MATMUL_KERNELS, "sync_rng": _WHEN,
            "check_inputs": _WHEN, "fallback": _FALLBACKS, "all_reduce": ALL_REDUCE_CHOICES,
            "outputs": _OUTPUTS, "lm_head": LM_HEAD_CHOICES, "balance": BALANCE_CHOICES}
_DEFAULTS = {f.name: f.default for f in fields(TPOptions) if f.name in _CHOICES}


def validate_options(options: Mapping[str, Any] | None) -> TPOptions:
    """Check ``options`` and fill defaults.

    Raises:
        TPOptionsTypeError: ``options`` is not a mapping, or a value has the wrong type.
        TPOptionsError: an unknown key or a bad value (the message names it).
        TPProcessGroupError: no ``tp_group`` and torch.distributed is not initialised.
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TPOptionsTypeError(f"tp_auto options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_DOCS))
    if unknown:
        valid = ", ".join(sorted(OPTION_DOCS))
        raise TPOptionsError(f"unknown tp_auto option {unknown[0]!r}; valid options: {valid}")
    sp = options.get("sequence_parallel", False)
    if not isinstance(sp, bool):
        raise TPOptionsTypeError(f"tp_auto option 'sequence_parallel' must be True or False, "
                                 f"got {type(sp).__name__}")
    chosen = {}
    for key, choices in _CHOICES.items():
        chosen[key] = options.get(key, _DEFAULTS[key])
        if chosen[key] not in choices:
            raise TPOptionsError(f"tp_auto option {key!r} must be one of {choices}, "
                                 f"got {chosen[key]!r}")
    if chosen["mode"] != "default" and chosen["compiler"] != "inductor":
        raise TPOptionsError(f"tp_auto option 'mode' is Inductor's compile mode; "
                             f"mode={chosen['mode']!r} needs compiler='inductor', got "
                             f"compiler={chosen['compiler']!r}")
    group = options.get("tp_group")
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise TPProcessGroupError(
                "tp_auto needs a tensor-parallel process group, and torch.distributed is not "
                "initialised. Launch with torchrun and call torch.distributed.init_process_group() "
                "(backend 'nccl' on GPUs, 'gloo' on CPU) before the first call of the compiled "
                "model, or pass options={'tp_group': group}.")
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TPOptionsTypeError(
            f"tp_auto option 'tp_group' must be a torch.distributed.ProcessGroup, got "
            f"{type(group).__name__}")
    return TPOptions(tp_group=group, tp_rank=dist.get_rank(group),
                     tp_size=dist.get_world_size(group), sequence_parallel=sp, **chosen)
