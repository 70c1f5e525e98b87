"""Work balance (the ``balance="work"`` option; the default, ``"off"``, splits evenly):
where an uneven split leaves the ranks unequal work, deal an evenly split projection out by
weight so that every rank's modelled work is the same.

An uneven split gives some ranks more: SmolLM2-135M's 9 attention heads go 5 + 4 at TP=2,
or 6 + 3 when the queries are dealt in whole KV groups (3 groups of 3 heads, each rank then
computing only its own keys and values). The ranks meet at every all-reduce, so each layer
takes as long as its busiest rank. The MLP's projections (gate and up, column-parallel;
down, row-parallel after them) split evenly by default; dealing their features by weight
instead (``Shard(units=F, counts=...)``, rank 0 fewer where it has more heads) evens the
ranks out at no cost in communication: the same all-reduces, of the same sizes.

The work model counts floating-point operations per rank, from the solved graph's local
shapes: ``2·M·K·N`` for each matmul (``mm``, ``addmm``, ``bmm``, ``baddbmm``) and
``4·B·H·Sq·Skv·D`` for each attention (``tp_backend::sdpa``, its two products; the causal
mask's saving is not counted: this machine's CPU attention kernel runs at about 1.5x the
time per flop of its GEMM, which the full count roughly matches). A dynamic size counts at
its value when the graph was compiled (the hint). Element-wise work, norms and collectives
are left out: they split evenly with the matmuls or not at all.

The balanced projections are the column-parallel seeds split evenly (plain ``Shard``)
other than the LM head; all of them get the same weights (one fraction per rank), so gate
and up stay split alike. A rank's share of ``F`` features is rounded to a multiple of 16
(single features where ``F`` has fewer than 8 such tiles per rank), which keeps GEMM
tiles whole.

Owns: the work model (:func:`rank_work`) and the choice of weights (:func:`plan_counts`).
Must not: solve or re-solve (:mod:`tp_backend.solver` does, with these counts as the
seeds' preference, and keeps the even solution unless the weighted one places every value
alike), or move data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .placement import HeadGroup, Shard
from .rules import Role

__all__ = ["Balance", "rank_work", "plan_counts", "ALIGN", "MIN_GAIN"]

aten = torch.ops.aten
_MATMULS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}
_LAYOUT = {aten.t, aten.permute, aten.transpose, aten._to_copy, aten.clone, aten.alias,
           aten.detach, aten.view, aten._unsafe_view, aten.reshape, aten.expand}
# A rank's share of a balanced projection's features is a multiple of this.
ALIGN = 16
# Balance only where the busiest rank's modelled work is this far above the mean.
MIN_GAIN = 0.01


@dataclass(frozen=True)
class Balance:
    """What :func:`plan_counts` chose: ``counts`` per seed node (units per rank) and the
    ranks' modelled work before and after, in FLOPs per forward."""

    counts: dict
    before: tuple
    after: tuple


def _num(s) -> int:
    """A size as a number: a dynamic size at its hint (1 where it has none)."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    try:
        return int(hint) if hint is not None else 1
    except (TypeError, ValueError):
        return 1


def _local_shape(node: fx.Node, p, tp_rank: int, tp_size: int) -> list:
    """``node``'s shape on rank ``tp_rank`` under placement ``p`` (a Shard's dim local)."""
    shape = [_num(s) for s in node.meta["val"].shape]
    if isinstance(p, Shard):
        size = shape[p.dim]
        shape[p.dim] = (p.local_size(size, tp_rank, tp_size)
                        if p.units is None or size % p.units == 0 else size // tp_size)
    elif isinstance(p, HeadGroup):
        shape[p.dim] = len(p.local_heads(tp_rank, tp_size))
    return shape


def _input_placement(sol, node, a):
    dec = sol.decisions.get(node)
    want = dec.inputs.get(a) if dec is not None else None
    return want if want is not None else sol.placements.get(a)


def _node_work(sol, node: fx.Node, tp_rank: int, tp_size: int) -> float:
    """FLOPs of ``node`` on rank ``tp_rank`` (0 for ops the model does not count)."""
    op = getattr(node.target, "overloadpacket", None)
    if op in _MATMULS:
        ia, ib = _MATMULS[op]
        a, b = node.args[ia], node.args[ib]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return 0.0
        la = _local_shape(a, _input_placement(sol, node, a), tp_rank, tp_size)
        lb = _local_shape(b, _input_placement(sol, node, b), tp_rank, tp_size)
        return 2.0 * math.prod(la[:-1]) * la[-1] * lb[-1]
    if op is not None and op._qualified_op_name.startswith("tp_backend::sdpa"):
        q, k = node.args[0], node.args[1]
        lq = _local_shape(q, _input_placement(sol, node, q), tp_rank, tp_size)
        skv = _num(k.meta["val"].shape[-2])
        return 4.0 * math.prod(lq[:-1]) * skv * lq[-1]
    return 0.0


def rank_work(sol, tp_size: int, nodes=None) -> tuple:
    """Each rank's modelled work (FLOPs per forward) under solution ``sol``, over ``nodes``
    (default: every decided node)."""
    nodes = sol.decisions if nodes is None else nodes
    return tuple(sum(_node_work(sol, n, r, tp_size) for n in nodes) for r in range(tp_size))


def _param_of(node: fx.Node) -> fx.Node:
    """The value ``node`` is a layout chain of (``t``, ``permute``, casts...: one tensor
    input each), back to where the chain starts (a parameter's placeholder)."""
    while node.op == "call_function" and len(node.all_input_nodes) == 1 \
            and getattr(node.target, "overloadpacket", None) in _LAYOUT:
        node = node.all_input_nodes[0]
    return node


def _balanceable(sol) -> set:
    """The column-parallel seeds split evenly (plain ``Shard``), the LM head's excepted:
    its split decides the logits' all-gather, and its work is per output token."""
    out = set()
    for node, dec in sol.decisions.items():
        if dec.seed is not Role.COLUMN or not isinstance(dec.out, Shard) or not dec.out.plain:
            continue
        if any(_param_of(a) in sol.lm_head for a in node.all_input_nodes):
            continue
        out.add(node)
    return out


def _counts(features: int, shares: list, tp_size: int) -> tuple | None:
    """``features`` dealt by ``shares`` (fractions summing to 1), each rank's count a
    multiple of :data:`ALIGN` where ``features`` has at least 8 such tiles per rank (else
    single features: the rounding would undo the balance), at least one unit each."""
    align = ALIGN if features % ALIGN == 0 and features // (ALIGN * tp_size) >= 8 else 1
    units = features // align
    counts = [max(1, round(f * units)) for f in shares[:-1]]
    last = units - sum(counts)
    if last < 1:
        return None
    return tuple(c * align for c in counts + [last])


def plan_counts(sol, tp_size: int) -> Balance | None:
    """The weights that even out the ranks' modelled work under ``sol``, or ``None`` where
    the ranks are within :data:`MIN_GAIN` of each other already, or nothing can move work
    (no evenly split column-parallel projection besides the LM head).

    Work of the balanced projections (the seeds and every matmul their split reaches, the
    MLP's down projection) moves with the weights; the rest (``fixed``) does not. With
    ``A`` the balanced work and ``T`` the mean of all work, rank ``r`` gets the share
    ``(T - fixed[r]) / A`` of the balanced features."""
    seeds = _balanceable(sol)
    if not seeds or tp_size < 2:
        return None
    moving = {n for n in sol.decisions if (t := sol.taint.get(n)) and t <= seeds}
    fixed_nodes = [n for n in sol.decisions if n not in moving]
    fixed = rank_work(sol, tp_size, fixed_nodes)
    movable = rank_work(sol, tp_size, moving)
    before = tuple(f + m for f, m in zip(fixed, movable))
    total, a = sum(before), sum(movable)
    mean = total / tp_size
    if a <= 0 or mean <= 0 or max(before) <= mean * (1 + MIN_GAIN):
        return None
    shares = [(mean - f) / a for f in fixed]
    if min(shares) <= 0:  # more fixed work on one rank than the mean: as far as it goes
        shares = [max(s, 0.0) for s in shares]
        shares = [s / sum(shares) for s in shares]
    counts = {}
    for seed in seeds:
        out = seed.meta["val"]
        features = int(out.shape[sol.decisions[seed].out.dim])
        c = _counts(features, shares, tp_size)
        if c is None:
            return None
        counts[seed] = c
    after = tuple(f + a * s for f, s in zip(fixed, shares))
    return Balance(counts=counts, before=before, after=after)
