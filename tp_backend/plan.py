"""The tensor-parallel plan: what the solver decided, as data.

A :class:`TPPlan` lists, per parameter FQN, its layout (``column``, ``row``, ``vocab``,
``shard`` for other sharded parameters such as a column-parallel bias, or ``replicate``)
with global and local shapes, and the collectives inserted into the forward graph with the
module and layer they belong to. It is logged at INFO when a graph is compiled and kept on
the backend (:func:`tp_backend.last_plan`) for tests and tools.

Owns: the plan as data (:class:`TPPlan`, :class:`ParamPlan`, :class:`CollectivePlan`), its
queries (``layouts``, ``collectives_per_layer``, ``param_bytes``) and ``summary()``.
Must not: compute a plan (:mod:`tp_backend.pipeline` builds it from the solver's
:class:`~tp_backend.solver.Solution`), or print the per-layer table
(:func:`tp_backend.planning.format_plan`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rules import Role

__all__ = ["ParamPlan", "CollectivePlan", "TPPlan"]


@dataclass(frozen=True)
class ParamPlan:
    """One parameter: ``layout`` and ``shard_dim`` (``None`` if replicated); shapes in
    elements, ``nbytes_local``/``nbytes_global`` in bytes. ``fqn`` is the name the model's
    ``named_parameters()`` gives it; ``aliases`` its other names when it is tied (e.g.
    ``lm_head.weight`` for ``model.embed_tokens.weight``). ``rank_sizes``: the split dim's
    size on each rank, where an uneven split (heads that ``tp_size`` does not divide) gives
    the ranks different sizes; empty otherwise."""

    fqn: str
    layout: Role
    shard_dim: int | None
    global_shape: tuple
    local_shape: tuple
    nbytes_global: int
    nbytes_local: int
    aliases: tuple = ()
    rank_sizes: tuple = ()

    def shape_text(self) -> str:
        """The local shape, the split dim as ``5|4`` where the ranks' sizes differ."""
        dims = [str(d) for d in self.local_shape]
        if self.rank_sizes:
            dims[self.shard_dim] = "|".join(map(str, self.rank_sizes))
        return "[" + ", ".join(dims) + "]"


@dataclass(frozen=True)
class CollectivePlan:
    """One collective in the forward graph: ``kind`` is ``all_reduce``, ``all_gather`` or
    ``reduce_scatter`` (sequence parallelism);
    ``layer`` the repeated-block index (``None`` outside the blocks)."""

    kind: str
    module: str
    layer: int | None
    shape: tuple | None


@dataclass
class TPPlan:
    """The plan of one compiled graph on one rank (identical on every rank but ``tp_rank``)."""

    tp_size: int
    tp_rank: int
    params: dict = field(default_factory=dict)  # fqn -> ParamPlan
    collectives: list = field(default_factory=list)  # [CollectivePlan]
    replicated_ops: list = field(default_factory=list)  # [(description, reason)]
    demoted: list = field(default_factory=list)  # descriptions of seeds kept whole
    vetoed: list = field(default_factory=list)  # seeds the self-check replicated (node names)
    solve_seconds: float = 0.0
    rounds: int = 0
    num_nodes: int = 0
    timings: dict = field(default_factory=dict)  # seconds per pass (decompose, solve, rewrite)
    # What sums the all-reduces: "group" (the process group's backend: gloo, NCCL) or "shm"
    # (DeepSpeed's same-host shared-memory kernel for CPU float tensors, tp_backend.shm).
    all_reduce_impl: str = "group"
    # sequence_parallel: values split over their tokens (the regions between a row-parallel
    # output's reduce-scatter and the next all-gather: residual adds, norms, dropout)
    sequence_values: int = 0
    # the LM head (the parameters behind the logits, a graph output split on its last dim
    # where the head is vocab-parallel) and the lm_head option's choice for it
    lm_head: tuple = ()
    lm_head_choice: str = "split"
    # what the work balance chose (the balance option), "" where it changed nothing
    balance: str = ""
    # attention calls whose mask, built in the graph, is the causal pattern: they run with
    # is_causal=True instead (tp_backend.causal)
    causal_masks: int = 0

    def sequence_regions(self) -> list:
        """Modules whose (partial-sum) output is reduce-scattered over the tokens, each
        starting a sequence-parallel region, in graph order."""
        return [c.module for c in self.collectives if c.kind == "reduce_scatter"]

    def layouts(self) -> dict:
        """``{layout: [fqn, ...]}``."""
        out: dict = {}
        for p in self.params.values():
            out.setdefault(p.layout, []).append(p.fqn)
        return out

    def layout_of(self, fqn: str) -> str:
        return self.params[fqn].layout

    def collectives_per_layer(self, kind: str = "all_reduce") -> dict:
        """``{layer: count}`` of collectives of ``kind`` (``None`` = outside the blocks)."""
        return dict(Counter(c.layer for c in self.collectives if c.kind == kind))

    def param_bytes(self) -> tuple[int, int]:
        """``(bytes on this rank, bytes of the unsharded model)`` over the graph's parameters."""
        return (sum(p.nbytes_local for p in self.params.values()),
                sum(p.nbytes_global for p in self.params.values()))

    def summary(self) -> str:
        lines = [f"tp_auto plan: tp_size={self.tp_size}, {self.num_nodes} ATen nodes solved in "
                 f"{self.solve_seconds * 1e3:.1f} ms ({self.rounds} rounds)"]
        for layout, fqns in sorted(self.layouts().items()):
            lines.append(f"  {layout:9s} {len(fqns):4d} parameters, e.g. {fqns[0]}")
        local, full = self.param_bytes()
        if full:
            lines.append(f"  parameter bytes per rank: {local / 2**20:.2f} MiB of "
                         f"{full / 2**20:.2f} MiB ({local / full:.1%})")
        for kind in ("all_reduce", "reduce_scatter", "all_gather"):
            per = self.collectives_per_layer(kind)
            if per:
                layers = sorted(k for k in per if k is not None)
                inner = Counter(per[k] for k in layers)
                desc = ", ".join(f"{n} per layer in {c} layers" for n, c in sorted(inner.items()))
                outside = per.get(None, 0)
                impl = (f" [{self.all_reduce_impl}]" if kind != "all_gather" else "")
                lines.append(f"  {kind}{impl}: {sum(per.values())} in total"
                             + (f" ({desc}" + (f"; {outside} outside the layers)" if outside else ")")
                                if layers else ""))
        if self.sequence_values:
            regions = self.sequence_regions()
            lines.append(f"  sequence parallel: {len(regions)} regions split over the tokens "
                         f"({self.sequence_values} values), e.g. after "
                         f"{regions[0] or 'the graph input'}" if regions else
                         f"  sequence parallel: {self.sequence_values} values split over the "
                         "tokens")
        if self.lm_head:
            names = ", ".join(
                f + (f" (tied: {', '.join(self.params[f].aliases)})"
                     if f in self.params and self.params[f].aliases else "")
                for f in self.lm_head)
            lines.append(f"  LM head: {names} kept whole on every rank (lm_head='replicate': no "
                         "logits all-gather)" if self.lm_head_choice == "replicate" else
                         f"  LM head: {names} vocab-parallel (the logits all-gathered; "
                         "lm_head='replicate' keeps it whole)")
        if self.causal_masks:
            lines.append(f"  attention: {self.causal_masks} calls with a mask built in the graph "
                         "that is the causal pattern run with is_causal=True")
        if self.balance:
            lines.append(f"  work balance: {self.balance} (balance='off' splits evenly)")
        if self.demoted:
            lines.append(f"  kept whole (a shard would need a gather): {len(self.demoted)}, e.g. "
                         f"{self.demoted[0]}")
        if self.replicated_ops:
            lines.append(f"  ops evaluated replicated: {len(self.replicated_ops)}, e.g. "
                         f"{self.replicated_ops[0][0]}: {self.replicated_ops[0][1]}")
        return "\n".join(lines)
