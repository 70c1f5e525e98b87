"""Checks a propagation rule by simulating the ranks in one process.

``check(fn, inputs, placements)`` traces ``fn`` (a call of one ATen op) to core ATen, asks
the rule of that op for a decision given the input placements, then *runs* the decision:
for every simulated rank it builds the local inputs (in the placements the decision asks
for: a shard is this rank's chunk, a partial sum is one of N random addends), calls the op
with its local arguments (``tp_backend.local_args``, from the decided placements, per rank),
reassembles the output from its placement
(concatenate shards, sum partials, or check every rank holds the same replicated value)
and compares with the op on the global inputs. A rule that claims something it cannot
deliver fails here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.fx as fx
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_map

from tp_backend.layers import (add_bias, kv_head_slice, local_shard, partial_product,
                               vocab_parallel_embedding)
from tp_backend.local_args import local_args
from tp_backend.placement import REPLICATE, HeadGroup, Placement
from tp_backend.rules import Action, Decision, lookup


@dataclass
class Checked(Decision):
    """A decision :func:`check` simulated, with rank 0's local arguments (``None`` where
    they are the node's own)."""

    args: tuple | None = None


class StubCtx:
    """A rule context over given placements; ``params`` are parameter inputs."""

    def __init__(self, placements: dict, tp_size: int, params=(), seeds_allowed=True):
        self.tp_size = tp_size
        self._pl = placements
        self._params = set(params)
        self._seeds = seeds_allowed
        self.notes = []
        self.group_kv = False
        self.pending = None

    def placement(self, arg):
        return self._pl.get(arg, REPLICATE) if isinstance(arg, fx.Node) else REPLICATE

    def shape(self, arg):
        return tuple(arg.meta["val"].shape)

    def is_param(self, arg):
        return arg in self._params

    def can_seed(self, node):
        return self._seeds

    def note(self, node, reason):
        self.notes.append(reason)

    def forced_whole(self, node):
        return False

    def worth_vocab_split(self, table):
        return True  # the split forced: rule checks must not depend on the cost model

    def prefer(self, value, dim, cuts):
        self.prefs = sorted(cuts)

    def preference(self, seed):
        return getattr(self, "blocks", None)

    def prefer_units(self, value, dim, units):
        self.units_asked = units
        return self.units_ok

    def units_preference(self, seed):
        return getattr(self, "units", None)

    def pending_units(self, value):
        return getattr(self, "pending", None)

    def prefer_coarser_units(self, value, units):
        self.coarser_asked = units
        return self.units_ok

    def balance_counts(self, seed):
        return getattr(self, "counts", None)

    def describe(self, node):
        return node.name


def trace(fn, inputs):
    """``fn`` traced to core ATen; returns (graph module, the single op node)."""
    gm = make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="fake")(*inputs)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"
           and n.target.__module__ != "_operator"]
    return gm, ops[-1]


def _gather(parts, p: Placement):
    if p.is_partial():
        return sum(parts)
    if p.is_replicate():
        for q in parts[1:]:
            torch.testing.assert_close(q, parts[0], rtol=0, atol=0)
        return parts[0]
    # per block: concatenate the ranks' runs of it, in rank order
    n = len(parts)
    size = sum(t.shape[p.dim] for t in parts)
    pieces = [t.split([length for _, length in p.ranges(size, r, n)], dim=p.dim)
              for r, t in enumerate(parts)]
    return torch.cat([pc[i] for i in range(len(pieces[0])) for pc in pieces], dim=p.dim)


def _local(value, p: Placement, rank, n, gen):
    if p.is_replicate():
        return value
    if p.is_partial():
        parts = [torch.randn(value.shape, generator=gen) for _ in range(n - 1)]
        if value.dtype not in (torch.float32, torch.float64):
            parts = [t.mul(4).round() for t in parts]  # integers: exact sums in low precision
        parts = [t.to(value.dtype) for t in parts]
        parts.append(value - sum(parts))
        return parts[rank]
    if isinstance(p, HeadGroup):
        return kv_head_slice(value, p.dim, p.local_heads(rank, n))
    return local_shard(value, p.dim, p.outer, rank, n, p.blocks, p.units, p.counts)


def check(fn, inputs, placements, *, tp_size=2, params=(), seeds_allowed=True, expect=None,
          blocks=None, units=None):
    """Trace, decide and simulate; returns the decision (``None`` if the rule refuses).

    ``placements`` gives one placement per input; ``params`` the indices of inputs that are
    parameters. ``expect``, if given, is the expected output placement.
    """
    gm, node = trace(fn, inputs)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dec, notes = decide(node, ph, placements, tp_size=tp_size, params=params,
                        seeds_allowed=seeds_allowed, blocks=blocks, units=units)
    if expect is not None:
        assert dec is not None, f"rule refused: {notes}"
        assert dec.out == expect, f"expected {expect}, got {dec.out}"
    if dec is None:
        return None
    simulate(node, ph, inputs, placements, dec, tp_size=tp_size)
    local = rank_args(node, ph, placements, dec, 0, tp_size)
    return Checked(**{f.name: getattr(dec, f.name) for f in fields(dec)},
                   args=local[0] if local else None)


def rank_args(node, ph, placements, dec, tp_rank, tp_size):
    """Rank ``tp_rank``'s local ``(args, kwargs)`` of ``node`` under ``dec`` (``None``:
    unchanged)."""
    pl = dict(zip(ph, placements))
    return local_args(node, dec.out, lambda a: dec.inputs.get(a, pl.get(a, REPLICATE)),
                      tp_rank, tp_size)


def decide(node, ph, placements, *, tp_size=2, params=(), seeds_allowed=True, blocks=None,
           units=None, units_ok=True, ctx_out=None, group_kv=False, pending=None):
    """The rule's decision for ``node`` when placeholder ``ph[i]`` has ``placements[i]``;
    returns ``(decision or None, the rule's notes)``."""
    pl = dict(zip(ph, placements))
    ctx = StubCtx(pl, tp_size, [ph[i] for i in params], seeds_allowed)
    ctx.blocks = blocks
    ctx.units = units
    ctx.units_ok = units_ok  # whether the seed can be asked for an uneven split
    ctx.group_kv = group_kv  # whether attention may ask for whole KV groups
    ctx.pending = pending  # the units a request of this round gives the seed next round
    if ctx_out is not None:
        ctx_out.append(ctx)
    return lookup(node.target)(ctx, node), ctx.notes


def simulate(node, ph, inputs, placements, dec, *, tp_size=2, rtol=1e-5, atol=1e-5,
             same_rng=False, shape_only=False):
    """Run ``dec`` rank by rank and check that its output placement reassembles ``node``'s
    result on the global ``inputs`` (raises ``AssertionError`` if not, or whatever the
    local op raises). ``same_rng`` seeds every rank's (and the global) call alike, for
    random ops: the ranks of a real run must agree on their generators as well.
    ``shape_only`` compares shapes only (uninitialised outputs: ``empty``). Each rank runs
    the op with its own local arguments (they differ by rank for an uneven split)."""
    pl = dict(zip(ph, placements))
    env = dict(zip(ph, inputs))

    def call(args, kwargs=None):
        if same_rng:
            torch.manual_seed(1234)
        # fresh copies: an in-place op (copy_) must not write into the inputs
        args = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)
        out = node.target(*args, **(node.kwargs if kwargs is None else kwargs))
        return tree_map(torch.zeros_like, out) if shape_only else out

    expected = call(tree_map(lambda a: env.get(a, a) if isinstance(a, fx.Node) else a, node.args))
    gen = torch.Generator().manual_seed(0)
    # Partial inputs: the same random addends on every rank, drawn once.
    partial_parts = {}
    for a, p in pl.items():
        want = dec.inputs.get(a, p)
        if p.is_partial():
            parts = [_local(env[a], p, r, tp_size, torch.Generator().manual_seed(7))
                     for r in range(tp_size)]
            # A conversion away from Partial (all-reduce, then maybe slice) sees the sum.
            partial_parts[a] = parts if want.is_partial() else None
    outs = []
    for r in range(tp_size):
        def local(a):
            if not isinstance(a, fx.Node):
                return a
            want = dec.inputs.get(a, pl.get(a, REPLICATE))
            if partial_parts.get(a) is not None:
                return partial_parts[a][r]
            return _local(env[a], want, r, tp_size, gen)
        rargs, rkwargs = rank_args(node, ph, placements, dec, r, tp_size) \
            or (node.args, node.kwargs)
        largs = tree_map(local, tuple(rargs))
        if dec.action is Action.VOCAB_EMBEDDING:
            step = largs[0].shape[0]
            outs.append(vocab_parallel_embedding(largs[0], largs[1], r * step, (r + 1) * step))
        elif dec.action is Action.ROW_ADDMM:
            outs.append(partial_product(largs[1], largs[2]))  # bias added below
        elif dec.action is Action.VOCAB_CROSS_ENTROPY:
            outs.append(largs)  # combined below
        else:
            outs.append(call(largs, rkwargs))
    if dec.action is Action.VOCAB_CROSS_ENTROPY:
        # The vocab-parallel loss combines the ranks' class ranges (its numerics against
        # F.cross_entropy: test_vocab_loss.py); here: the ranges, in rank order, tile the
        # logits, and the loss of the tiled logits is the op's.
        whole = torch.cat([a[0] for a in outs], dim=1)
        total = call((whole, *outs[0][1:]), rkwargs)
        outs = [total for _ in outs]
    if dec.action is Action.ROW_ADDMM:  # the layer all-reduces, then adds the bias once
        total = add_bias(sum(outs), env.get(node.args[0], node.args[0]), **node.kwargs)
        outs = [total for _ in outs]
    if isinstance(expected, (tuple, list)):
        for i, e in enumerate(expected):
            got = _gather([o[i] for o in outs], dec.out[i])
            torch.testing.assert_close(got, e, rtol=rtol, atol=atol, equal_nan=True)
    else:
        got = _gather(outs, dec.out)
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True)
