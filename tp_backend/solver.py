"""The parallel-axis solver: a placement for every value of a core-ATen graph.

Algorithm (iterative, deterministic, linear in graph size per round):

1. *Propagate*: one pass over the nodes in topological order. Placeholders are replicated
   (or keep the shard of a parameter sharded by an earlier compile). Each op's rule
   (:mod:`tp_backend.rules`) picks the output placement from its inputs' placements and
   says which inputs to convert. Some rules *seed* a shard: a column-parallel matmul or a
   vocab-parallel embedding on a replicated parameter. Every sharded value carries its
   *taint*, the seeds it came from.
2. *Conflicts*: where an op cannot use a sharded input (no rule, or no proven sharded
   evaluation), the input must be all-gathered. Inside the graph that is a conflict: the
   tainting seeds are demoted (replicated) and the pass is run again. At graph outputs and
   losses the all-gather is accepted (an LM head gathers its logits).
   Consumers may also send a seed a *preference* for the next round: the block layout of
   a fused projection (``ctx.prefer``; the cuts of a piece split off it, even after ops
   that keep its size, count from where the piece starts: Mamba-2's ``[z | x B C | dt]``
   then ``[x | B | C]``), or whole units for a split ``N`` does not divide
   (``ctx.prefer_units``: 9 heads dealt 5 + 4 instead of 288 features each). A round
   that changes a preference is always followed by another and its placements are
   discarded, so a rule that asks may decide provisionally as if granted
   (``ctx.pending_units``): every layer's view then asks in the same round, instead of
   one layer per round (the next layer's request waits on this one's output projection).
3. Repeat until no conflict is left. Each round demotes at least one seed, so it ends;
   all conflicts of a round are collected at once, so identical layers are fixed in the
   same round and the round count does not grow with depth.
4. *Sequence parallelism* (``sequence_parallel=True``), once steps 1-3 have settled (the
   all-reduces below are placed): a ``Partial`` value whose consumer is sequence-wise
   (:func:`_sequence_wise`) is reduce-scattered over its tokens instead
   (:func:`_token_shard`); sequence-wise ops keep the token split, every other op sees it
   whole (an all-gather before it). Token splits carry no taint: gathering them is never
   a conflict.

``Partial`` values (row-parallel outputs, vocab-parallel lookups) are all-reduced lazily,
right before the first op that is not linear in them: for a standard decoder this is the
residual add after attention and after the MLP -- Megatron's 2 all-reduces per layer.

Parameter storage: a parameter is stored sharded on dim ``d`` when every use of it
(through layout ops such as ``t``/``permute``/``_to_copy``/``squeeze``, ``select`` of one
expert of a stacked ``[E, out, in]`` parameter, and unary element-wise ops such as ``exp``:
``_CHAIN``) asks for that shard; otherwise
it stays whole and the uses that need a shard slice it locally.

Owns: :func:`solve` and its result (:class:`Solution`, :class:`Conversion`): the rounds,
seeds and their taint, conflicts and demotion, preferences, where ``Partial`` values are
all-reduced or reduce-scattered (sequence parallelism, which ops may run on a token split),
parameter storage (``_CHAIN``) and outputs kept split (key/value caches).
Must not: decide what one op can do with a sharded input (its rule in
:mod:`tp_backend.rules` does), rewrite the graph or its arguments (:mod:`tp_backend.rewrite`,
:mod:`tp_backend.local_args`), or build the user's plan (:mod:`tp_backend.pipeline`).
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .nodemeta import describe, role
from . import balance
from .placement import REPLICATE, Collective, Partial, Placement, Shard
from .rules import (Action, Decision, Indivisible, Role, arg, lookup, replicate_all,
                    static_int, tensor_inputs)
from .rules.attention import is_kv_cache
from .rules.view import layout_dim_map

log = logging.getLogger(__name__)

__all__ = ["Solution", "Conversion", "solve"]

aten = torch.ops.aten
# Ops that map a parameter to a value whose every slice is the op of the parameter's slice:
# layout ops, casts, and unary element-wise ops (Mamba-2's A = -exp(A_log)). A value made by
# a chain of them follows the parameter's storage (computed from the local shard).
_CHAIN = {aten.t, aten.permute, aten.transpose, aten._to_copy, aten.clone, aten.alias,
          aten.detach, aten.lift_fresh_copy, aten.squeeze, aten.unsqueeze, aten.exp, aten.neg,
          aten.select}


# A lookup table this many times smaller than the graph's largest parameter stays whole
# (see _Ctx.worth_vocab_split). 0 splits every table the rules allow (tests force it so).
SMALL_TABLE_RATIO = 8


@dataclass
class Conversion:
    """Redistribution of input ``src`` before ``node``, from placement ``have`` to ``want``:
    a :attr:`collective` (none from ``Replicate``), then a free local slice where
    :attr:`slices`."""

    node: fx.Node
    src: fx.Node
    have: Placement
    want: Placement

    @property
    def collective(self) -> Collective | None:
        if self.have.is_partial():
            # (a partial sum wanted split: the sequence-parallel reduce-scatter)
            return (Collective.REDUCE_SCATTER if isinstance(self.want, Shard)
                    else Collective.ALL_REDUCE)
        return Collective.ALL_GATHER if self.have.is_shard() else None

    @property
    def slices(self) -> bool:
        """Whether this rank's part of the value is taken after the collective (a
        reduce-scatter delivers it)."""
        if self.collective is Collective.REDUCE_SCATTER:
            return False
        return self.have.is_replicate() or not self.want.is_replicate()


@dataclass
class Solution:
    """The solver's result for one graph (see :mod:`tp_backend.plan` for the user view)."""

    tp_size: int
    placements: dict = field(default_factory=dict)
    decisions: dict = field(default_factory=dict)
    conversions: list = field(default_factory=list)
    param_storage: dict = field(default_factory=dict)  # placeholder -> Shard | None
    param_role: dict = field(default_factory=dict)  # placeholder -> Role
    local_outputs: dict = field(default_factory=dict)  # output index -> Shard (KV cache)
    # output index -> Shard of other outputs returned split (see solve's ``outputs``)
    returned_split: dict = field(default_factory=dict)
    param_padding: dict = field(default_factory=dict)  # placeholder -> padded size of dim 0
    # input index -> name of every input that may be stored split: parameters, and state
    # the graph writes back into (a static KV cache)
    stored_inputs: dict = field(default_factory=dict)
    demoted: set = field(default_factory=set)
    taint: dict = field(default_factory=dict)  # value -> the seeds whose shard reached it
    notes: list = field(default_factory=list)  # (node, reason) for replicated ops
    # splits refused in any round only because tp_size does not divide a count (the note
    # is gone from the last round once the seed behind it stays whole)
    indivisible: list = field(default_factory=list)  # [rules.Indivisible]
    # values split on their tokens (sequence_parallel): the reduce-scattered partial sums
    # and what sequence-wise ops made of them
    sequence_values: set = field(default_factory=set)
    # the LM head: the parameters behind a graph output split on its last dim (the logits)
    lm_head: set = field(default_factory=set)
    lm_head_seeds: set = field(default_factory=set)  # seeds kept whole for lm_head="replicate"
    # what the work balance chose (solve's ``balance``), for the plan; "" where nothing
    balance: str = ""
    rounds: int = 0
    seconds: float = 0.0


class _Ctx:
    """What a rule sees of the solver during one propagation pass (the
    :class:`~tp_backend.rules.RuleContext` protocol): the placements so far, the seeds'
    taint and demotions, and the preferences consumers send back to seeds."""

    def __init__(self, *, tp_size, demoted, origin, placements, notes, reduced, prefs, taint,
                 new_prefs, forced, largest_param=0, sequence=None, sequence_parallel=False,
                 group_kv=False, counts=None, provisional=False):
        self.tp_size = tp_size
        # whether this round is sure to be followed by another if a preference changes
        # (not the last round allowed): see pending_units
        self._provisional = provisional
        # attention may ask its queries' seed for whole KV groups (see solve's ``balance``)
        self.group_kv = group_kv
        self._counts = counts or {}
        self.sequence_parallel = sequence_parallel
        self._sequence = sequence if sequence is not None else {}
        self.masked: set = set()  # sequence shards the op being decided sees as replicated
        self._largest_param = largest_param
        self._reduced = reduced
        self._prefs = prefs
        self._taint = taint
        self._new_prefs = new_prefs
        self._forced = forced
        self._demoted = demoted
        self._origin = origin
        self._pl = placements
        self._notes = notes

    def placement(self, arg):
        if isinstance(arg, fx.Node):
            if arg in self.masked:
                return REPLICATE
            p = self._pl.get(arg)
            if arg in self._sequence and isinstance(p, Partial):
                return self._sequence[arg]
            if not isinstance(p, Placement) or p.is_partial() and arg in self._reduced:
                return REPLICATE
            return p
        return REPLICATE

    def shape(self, arg):
        return tuple(arg.meta["val"].shape)

    def is_param(self, arg):
        return isinstance(arg, fx.Node) and arg in self._origin

    def can_seed(self, node):
        return node not in self._demoted

    def note(self, node, reason):
        self._notes.append((node, reason))

    def prefer(self, value, dim, cuts):
        """A consumer of ``value`` could use it if its seed split ``dim`` into the blocks
        between ``cuts`` (offsets along the dim, 0 and the size included). Where several
        seeds made ``value`` (JetMoE's experts, one matmul each, concatenated along the
        tokens), each must be found at a known offset, and each is asked for the cuts."""
        seeds = self._taint.get(value, ())
        if not seeds:
            return
        size = value.meta["val"].shape[dim]
        found = []
        for seed in sorted(seeds, key=lambda n: n.name):
            off = self._offset_in_seed(value, dim, seed)
            if off is None:
                if len(seeds) != 1 or seed.meta["val"].shape[-1] != size:
                    return
                off = 0
            found.append((seed, off))
        for seed, off in found:
            total = int(seed.meta["val"].shape[-1])
            cur = self._prefs.get(seed, frozenset())
            new = frozenset(cur | {off + c for c in cuts} | {0, off, off + int(size), total})
            if new != cur:
                self._new_prefs[seed] = new

    def _offset_in_seed(self, value, dim, seed) -> int | None:
        """Where dim ``dim`` of ``value`` starts among the output features of ``seed``, when
        ``value`` is a run of them: the seed's output through ops that keep the sharded
        dim's size (views, casts, element-wise ops, a depthwise convolution) and pieces of
        ``split`` along it (Mamba-2 splits its projection into ``[z | xBC | dt]``, then ``xBC``
        into ``[x | B | C]`` after a convolution). Several sharded inputs must agree (``x *
        sigmoid(x)``). ``None`` where no such path is found (a size change, a ``cat``).
        Memoised per value: the walk visits each value once."""
        memo: dict = {}

        def walk(node, d, depth=0):
            key = (node, d)
            if key not in memo:
                memo[key] = None
                if depth < 200:  # (well inside Python's recursion limit)
                    memo[key] = step(node, d, depth + 1)
            return memo[key]

        def step(node, d, depth):
            if node is seed:
                return 0 if d == len(node.meta["val"].shape) - 1 else None
            if node.op != "call_function":
                return None
            if node.target is operator.getitem:
                src, idx = node.args
                op = getattr(src.target, "overloadpacket", None)
                if op not in (aten.split, aten.split_with_sizes) or not isinstance(idx, int):
                    return None
                x = src.args[0]
                nd = len(x.meta["val"].shape)
                sdim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
                if sdim % nd != d:
                    return None
                sizes = [static_int(t.shape[d]) for t in src.meta["val"]]
                if None in sizes:
                    return None
                off = walk(x, d, depth)
                return None if off is None else off + sum(sizes[:idx])
            p = self._pl.get(node)
            if not isinstance(p, Shard) or p.dim != d:
                return None
            size = static_int(node.meta["val"].shape[d])
            found = set()
            for a in tensor_inputs(node):
                pa = self._pl.get(a)
                if isinstance(pa, Shard) and seed in self._taint.get(a, ()) \
                        and static_int(a.meta["val"].shape[pa.dim]) == size:
                    found.add(walk(a, pa.dim, depth))
            found.discard(None)
            return found.pop() if len(found) == 1 else None

        return walk(value, dim)

    def prefer_units(self, value, dim, units: int) -> bool:
        """A consumer of ``value`` could use it if its seed dealt dim ``dim`` out in whole
        groups of ``size / units`` (heads): the seed's units become the greatest common
        divisor of every such request. ``False`` where no single seed made the dim or the
        units left would be fewer than the ranks (the caller then keeps it whole)."""
        seeds = self._taint.get(value, ())
        if len(seeds) != 1:
            return False
        seed, = seeds
        size = static_int(value.meta["val"].shape[dim])
        if size is None or seed.meta["val"].shape[-1] != size:
            return False
        key = ("units", seed)
        cur = self._new_prefs.get(key, self._prefs.get(key, size))
        g = math.gcd(cur, int(units))
        if g < self.tp_size:
            return False
        if g != self._prefs.get(key):
            self._new_prefs[key] = g
        return True

    def units_preference(self, seed) -> int | None:
        """The units a seed's consumers asked it to split in (see :meth:`prefer_units`)."""
        return self._prefs.get(("units", seed))

    def pending_units(self, value) -> int | None:
        """The units the single seed of ``value`` is dealt in from the next round, where a
        request of this round (:meth:`prefer_units`) changes them and the solver is sure to
        run that round; ``None`` otherwise. Only then may a rule decide provisionally as
        if they held: the placements of a round that changed a preference are discarded,
        so a provisional decision never reaches the solution."""
        seeds = self._taint.get(value, ())
        if not self._provisional or len(seeds) != 1:
            return None
        key = ("units", next(iter(seeds)))
        new = self._new_prefs.get(key)
        return new if new is not None and new != self._prefs.get(key) else None

    def prefer_coarser_units(self, value, units: int) -> bool:
        """A consumer of ``value``, split in the units of its single seed, could use it if
        that seed dealt fewer, larger units: the greatest common divisor of its units and
        ``units`` (9 query heads dealt as 3 groups of 3, the groups of the 3 KV heads).
        Each new unit is a run of whole old ones, so every view between the seed and
        ``value`` that kept the old units keeps the new. ``False`` where ``value`` is not
        split in its seed's units or fewer units than ranks would be left."""
        seeds = self._taint.get(value, ())
        p = self._pl.get(value)
        if len(seeds) != 1 or not isinstance(p, Shard) or p.units is None \
                or p.counts is not None:
            return False
        seed, = seeds
        key = ("units", seed)
        cur = self._new_prefs.get(key, self._prefs.get(key))
        if cur != p.units:
            return False
        g = math.gcd(cur, int(units))
        if g < self.tp_size or g == cur:
            return False
        self._new_prefs[key] = g
        return True

    def balance_counts(self, seed) -> tuple | None:
        """Units per rank for an evenly split seed that the work balance deals out by
        weight instead (:mod:`tp_backend.balance`), or ``None``."""
        return self._counts.get(seed)

    def worth_vocab_split(self, table: fx.Node) -> bool:
        """Whether a vocab-parallel split of lookup table ``table`` (``[V, E]``) pays.

        The split saves ``(N-1)/N`` of the table per rank and costs an all-reduce of every
        lookup's ``[*, E]`` output (Megatron-LM accepts that for the word embedding, the
        largest weight of a language model). A table ``SMALL_TABLE_RATIO`` times smaller
        than the graph's largest parameter (a position table looked up by ``arange``,
        token-type embeddings) saves next to nothing, so it stays whole and its lookup
        needs no collective."""
        if SMALL_TABLE_RATIO <= 0:
            return True
        return table.meta["val"].numel() * SMALL_TABLE_RATIO >= self._largest_param

    def forced_whole(self, node):
        return node in self._forced

    def preference(self, seed):
        cuts = self._prefs.get(seed)
        if not cuts:
            return None
        c = sorted(cuts)
        return tuple(b - a for a, b in zip(c, c[1:]))

    def describe(self, node):
        return describe(node)


def _is_tensor_node(node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)


def _chain_map(node, perm):
    """Map a parameter-origin dim permutation through a layout op (``perm[d]`` = param dim,
    ``None`` for a size-1 dim that ``unsqueeze`` added), with the layout rules' own dim map
    (:func:`~tp_backend.rules.view.layout_dim_map`); ops that keep every dim (casts,
    ``clone``, ``exp``) keep the permutation."""
    fwd = layout_dim_map(node)
    if fwd is None:
        return list(perm)
    out = [None] * len(node.meta["val"].shape)
    for d, q in enumerate(perm):
        e = fwd(d)
        if e is not None:
            out[e] = q
    return out


@dataclass
class _Round:
    """What one propagation pass over the graph found."""

    placements: dict  # value -> Placement (a tuple of them for multi-output ops)
    decisions: dict  # node -> the rule's Decision
    conversions: list  # [Conversion]: inputs converted for their consumer
    demands: dict  # parameter -> [(Shard of the parameter, role)] its uses asked for
    r_used: set  # parameters some use needs whole
    conflicts: set  # seeds whose shard reached an op that needs the value whole
    notes: list  # [(node, reason)] values kept whole and why
    origin: dict  # value on a parameter's layout chain -> (parameter, dim permutation)
    new_reduced: set  # Partial values to all-reduce where they are made (next pass)
    new_prefs: dict  # seed -> the block cuts / units its consumers asked for (next pass)
    local_outputs: dict  # output index -> Shard of a key/value cache returned split
    returned_split: dict  # output index -> Shard of another output returned split
    taint: dict  # value -> the seeds whose shard reached it
    new_sequence: dict  # Partial value -> the token Shard to reduce-scatter it to (next pass)
    sequence_values: set  # values split on their tokens (sequence-parallel regions)
    head_params: set  # parameters of the seeds behind an output split on its last dim
    head_conflicts: set  # seeds kept whole for lm_head="replicate"


def _sequence_wise(node) -> bool:
    """Whether ``node`` may run in a sequence-parallel region (Megatron's: the norms,
    dropout and residual adds between a row-parallel output and the next column-parallel
    input): an element-wise op, a cast, a reduction, a layer norm or a dropout mask. Any
    other op sees its token-split inputs as whole (all-gathered before it): a matmul, so
    that its weight still splits column-parallel, and an op that needs the whole sequence
    (attention, a cumulative op, an index along the tokens)."""
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return True
    return getattr(target, "overloadpacket", None) in _SEQUENCE_WISE


# (not views: a view flattening the tokens feeds a matmul, and the all-gather before the
# view serves every view of the same value, q, k and v's alike)
_SEQUENCE_WISE = {aten._to_copy, aten.clone, aten.alias, aten.detach, aten.mean, aten.sum,
                  aten.var_mean, aten.amax, aten.native_layer_norm, aten.rand_like,
                  aten.native_dropout}


def _token_shard(value, tp_size) -> Shard | None:
    """The sequence-parallel split of ``value`` (``[*, T, E]``, floating): its second-last
    dim (the sequence of ``[B, S, E]``, the tokens of ``[B*S, E]``), evenly where
    ``tp_size`` divides it, else dealt out unevenly (``units``); ``None`` where it is
    shorter than ``tp_size`` (the decode step, ``S = 1``) or not a static size."""
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or not val.is_floating_point():
        return None
    d = val.dim() - 2
    size = static_int(val.shape[d])
    if size is None or size < tp_size:
        return None
    return Shard(d) if size % tp_size == 0 else Shard(d, units=size)


def _propagate(graph, tp_size, params, presharded, demoted, reduced, prefs, forced,
               outputs: str = "gather", sequence: dict | None = None,
               sequence_parallel: bool = False, replicate_head: bool = False,
               head_params: frozenset = frozenset(), group_kv: bool = False,
               counts: dict | None = None, provisional: bool = False) -> _Round:
    """One pass over ``graph`` in topological order: each op's rule decides its output
    placement from its inputs' (see the module docstring). ``provisional``: a changed
    preference is sure to bring another round (see :meth:`_Ctx.pending_units`)."""
    pl, taint, origin, decisions = {}, {}, {}, {}
    conversions, notes = [], []
    demands = defaultdict(list)  # param -> [(param_dim, outer, role)]
    r_used = set()
    conflicts = set()
    new_reduced = set()
    new_prefs = {}
    local_outputs, returned_split = {}, {}
    sequence = sequence or {}
    new_sequence: dict = {}
    seq: set = set()  # values split on their tokens
    head_seeds: set = set()  # seeds behind an output split on its last dim (the LM head)
    largest = max((p.meta["val"].numel() for p in params
                   if isinstance(p.meta.get("val"), torch.Tensor)), default=0)
    ctx = _Ctx(tp_size=tp_size, demoted=demoted, origin=origin, placements=pl, notes=notes,
               reduced=reduced, prefs=prefs, taint=taint, new_prefs=new_prefs, forced=forced,
               largest_param=largest, sequence=sequence,
               sequence_parallel=sequence_parallel, group_kv=group_kv, counts=counts,
               provisional=provisional)
    empty = frozenset()

    def convert(node, src, want, allow_gather):
        have = pl.get(src)
        have = have if isinstance(have, Placement) else REPLICATE
        if src in origin:
            param, perm = origin[src]
            if want == have or want.is_shard() and perm[want.dim] is None:
                r_used.add(param)
            elif want.is_shard():
                demands[param].append((want.moved(perm[want.dim]), None))
        if want == have:
            return
        if have.is_shard() and taint.get(src) and not allow_gather:
            conflicts.update(taint[src])
            log.debug("tp_auto: conflict at %s: %s needs %s, has %s", node.name, src.name, want, have)
        if have.is_partial() and len(src.users) > 1:
            # Once reduced for one consumer, every consumer should use the reduced value:
            # reducing at each of them would multiply the all-reduces.
            new_reduced.add(src)
        if sequence_parallel and have.is_partial() and want.is_replicate() \
                and src not in sequence and _sequence_wise(node):
            # Sequence parallelism: reduce-scatter the partial sum over its tokens instead
            # (next pass), for the consumers that can run on a token split.
            token = _token_shard(src, tp_size)
            if token is not None:
                new_sequence[src] = token
        conversions.append(Conversion(node, src, have, want))

    for node in graph.nodes:
        if node.op == "placeholder" or node in params:
            # (a padded copy of a parameter, see tp_backend.padding, stands in for it)
            if node in presharded:
                pl[node] = presharded[node]
            elif isinstance(node.meta.get("val"), torch.Tensor):
                pl[node] = REPLICATE
                if node in params:
                    nd = len(node.meta["val"].shape)
                    origin[node] = (node, list(range(nd)))
            taint[node] = empty
            continue
        if node.op == "output":
            outs, _ = tree_flatten(node.args[0])
            split_outputs = outputs == "split" or outputs == "split_with_loss" and any(
                d.action is Action.VOCAB_CROSS_ENTROPY for d in decisions.values())
            for i, o in enumerate(outs):
                if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor):
                    p = pl.get(o)
                    if isinstance(p, Shard) and p.outer == 1 and p.blocks is None \
                            and is_kv_cache(o):
                        # A key/value cache returned for the next step: it stays split
                        # over heads (evenly or not), so each rank keeps its heads' cache.
                        local_outputs[i] = p
                        continue
                    if isinstance(p, Shard) and p.dim == o.meta["val"].dim() - 1 \
                            and o not in seq:
                        # The logits of a column-parallel (vocab-split) LM head.
                        head_seeds.update(taint.get(o, empty))
                    if split_outputs and isinstance(p, Shard) and p.plain \
                            and (static_int(o.meta["val"].shape[p.dim]) or 1) % tp_size == 0:
                        # Returned to Python split (a TPTensor), not all-gathered.
                        returned_split[i] = p
                        continue
                    convert(node, o, REPLICATE, allow_gather=True)
            continue
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            src, idx = node.args
            p = pl.get(src)
            pl[node] = p[idx] if isinstance(p, tuple) else None
            taint[node] = taint.get(src, empty)
            if src in seq and isinstance(pl[node], Shard):
                seq.add(node)
            continue
        if not _is_tensor_node(node):
            continue
        op = getattr(node.target, "overloadpacket", None)
        x = node.args[0] if node.args else None
        if op in _CHAIN and isinstance(x, fx.Node) and x in origin and len(tensor_inputs(node)) == 1:
            param, perm = origin[x]
            origin[node] = (param, _chain_map(node, perm))
            pl[node] = REPLICATE
            taint[node] = empty
            decisions[node] = Decision(out=REPLICATE)
            continue
        rule = lookup(node.target)
        # Token-split inputs (sequence parallelism) are seen whole by an op that is not
        # sequence-wise, or whose rule cannot use them or would gather another split input
        # to match them: they are all-gathered before it.
        split_tokens = [a for a in tensor_inputs(node) if a in seq]
        ctx.masked = set() if _sequence_wise(node) else set(split_tokens)
        dec = rule(ctx, node) if rule is not None else None
        if split_tokens and not ctx.masked and rule is not None and (
                dec is None or any(taint.get(a) and ctx.placement(a).is_shard()
                                   and dec.inputs.get(a, ctx.placement(a)) != ctx.placement(a)
                                   for a in tensor_inputs(node) if a not in seq)):
            ctx.masked = set(split_tokens)
            dec = rule(ctx, node)
        if dec is None:
            shown = [repr(ctx.placement(a)) for a in tensor_inputs(node)]
            if any(s != "R" for s in shown):
                why = f"no rule for {node.target}" if rule is None else \
                    f"no proven sharded evaluation of {node.target}"
                notes.append((node, f"{why} with inputs {shown}"))
            elif rule is None:
                notes.append((node, f"no rule for {node.target} (inputs replicated, nothing "
                                    "lost)"))
            dec = replicate_all(ctx, node)
        t = set()
        for a in tensor_inputs(node):
            want = dec.inputs.get(a, ctx.placement(a))
            convert(node, a, want, dec.allow_gather)
            if want.is_shard() and ctx.placement(a).is_shard() and a not in seq:
                # (a reduce-scattered partial sum starts a token split of its own: the
                # seeds behind the partial sum do not reach it)
                t.update(taint.get(a, empty))
        if split_tokens and set(split_tokens) - ctx.masked and not _replicated_out(dec.out) \
                or node in sequence and isinstance(dec.out, Partial):
            seq.add(node)
        ctx.masked = set()
        for a, role in dec.roles.items():
            if a in origin and demands[origin[a][0]]:
                want, _ = demands[origin[a][0]][-1]
                demands[origin[a][0]][-1] = (want, role)
        if dec.seed:
            t.add(node)
        pl[node] = dec.out
        taint[node] = frozenset(t)
        decisions[node] = dec
    found = {origin[a][0] for s in head_seeds for a in tensor_inputs(s) if a in origin}
    head_conflicts: set = set()
    if replicate_head:
        # lm_head="replicate": the head's seeds, and every other seed on its parameters (the
        # lookup of a tied embedding), stay whole. (``head_params``: those found in earlier
        # rounds, before their seeds were demoted.)
        head_conflicts = {n for n, d in decisions.items() if d.seed and any(
            a in origin and origin[a][0] in head_params | found for a in tensor_inputs(n))}
        head_conflicts |= head_seeds
        conflicts |= head_conflicts
    return _Round(placements=pl, decisions=decisions, conversions=conversions,
                  demands=demands, r_used=r_used, conflicts=conflicts, notes=notes,
                  origin=origin, new_reduced=new_reduced, new_prefs=new_prefs,
                  local_outputs=local_outputs, returned_split=returned_split, taint=taint,
                  new_sequence=new_sequence, sequence_values=seq, head_params=found,
                  head_conflicts=head_conflicts)


def _replicated_out(out) -> bool:
    if isinstance(out, (tuple, list)):
        return all(_replicated_out(o) for o in out)
    return out is None or out.is_replicate()


def solve(graph: fx.Graph, *, tp_size: int, params: set, presharded: dict | None = None,
          max_rounds: int = 64, veto: frozenset = frozenset(),
          outputs: str = "gather", sequence_parallel: bool = False,
          lm_head: str = "split", balance: str = "off") -> Solution:
    """Assign a placement to every value of ``graph`` (see :func:`_solve_once`); then check
    that every write-back into graph state (``copy_``) that wants a split destination got
    one, else solve again with those writes kept whole (so state is never written through
    a local copy).

    ``outputs``: ``"split"`` returns a graph output split evenly on one dim (the logits of
    a column-parallel LM head) split (``Solution.returned_split``) instead of
    all-gathering it; ``"split_with_loss"`` does so where the graph computes a
    vocab-parallel cross-entropy; ``"gather"`` never. Other outputs are gathered as usual.

    ``sequence_parallel``: a partial sum whose consumers are sequence-wise (the residual
    add, the norm after a row-parallel output) is reduce-scattered over its tokens instead
    of all-reduced, and the region it starts runs split on the tokens until an op that is
    not sequence-wise (the next column-parallel matmul) all-gathers it: Megatron-LM's
    sequence parallelism (Korthikanti et al., "Reducing Activation Recomputation in Large
    Transformer Models", 2022, section 4.2.2). Partial sums with fewer tokens than ranks
    (decode) are all-reduced as without it.

    ``lm_head``: the LM head is the parameter behind a graph output split on its last dim
    (the logits of a column-parallel projection; found the same way in every model).
    ``"split"`` keeps it vocab-parallel (``1/N`` of it per rank, the logits all-gathered);
    ``"replicate"`` keeps it whole on every rank, with every other split of the same
    parameter (a tied embedding's lookup): no logits all-gather and, tied, no embedding
    all-reduce, for ``(N-1)/N`` of the head's bytes more per rank and ``N`` times its
    matmul. ``Solution.lm_head`` names it either way.

    ``balance``: ``"off"`` (default): even splits only, KV heads kept whole beside
    unevenly split queries. ``"work"`` evens out the ranks' modelled work where an uneven
    split leaves it unequal (:mod:`tp_backend.balance`): the evenly split projections (the
    MLP) are dealt by weight, and where query heads split unevenly beside keys and values
    kept whole, the split in whole KV groups (each rank then computes and caches only its
    own KV heads) is taken if its balanced work is lower. ``Solution.balance`` says what
    was chosen."""
    forced: set = set()
    t0 = time.perf_counter()
    while True:
        kw = dict(tp_size=tp_size, params=params, presharded=presharded,
                  max_rounds=max_rounds, forced=forced, veto=veto, outputs=outputs,
                  sequence_parallel=sequence_parallel, lm_head=lm_head)
        sol = _solve_once(graph, **kw)
        if balance == "work":
            sol = _balanced(graph, sol, kw)
        bad = {n for n, d in sol.decisions.items()
               if n.target is aten.copy_.default and isinstance(d.out, Shard)
               and sol.param_storage.get(arg(n, "self"),
                                         presharded and presharded.get(arg(n, "self"))) != d.out}
        if not bad - forced:
            sol.seconds = time.perf_counter() - t0
            return sol
        forced |= bad


def _kinds(p):
    """A placement with the deal of its units left out: what the work balance may change."""
    if isinstance(p, (tuple, list)):
        return tuple(_kinds(q) for q in p)
    if isinstance(p, Shard):
        return ("S", p.dim, p.outer, p.blocks)
    return type(p).__name__ if p is not None else None


def _same_layout(a: Solution, b: Solution) -> bool:
    """Whether ``b`` places every value as ``a`` does but for how units are dealt, with the
    same collectives: a weighted deal then changes who computes what, nothing else."""
    if a.demoted != b.demoted or len(a.conversions) != len(b.conversions):
        return False
    if any(_kinds(p) != _kinds(b.placements.get(n)) for n, p in a.placements.items()):
        return False
    return all(x.node is y.node and x.src is y.src and x.collective == y.collective
               for x, y in zip(a.conversions, b.conversions))


def _share_text(work: tuple) -> str:
    mean = sum(work) / len(work)
    return "/".join(f"{w / mean:.2f}" for w in work)


def _balanced(graph: fx.Graph, sol: Solution, kw: dict) -> Solution:
    """``solve``'s ``balance="work"`` (see :mod:`tp_backend.balance`). The candidates are
    ``sol`` and, where it splits something unevenly, the solution whose attention asks for
    the queries in whole KV groups (the keys and values then split with them instead of
    staying whole). Each is scored by its busiest rank's modelled work once dealt by
    weight (:func:`~tp_backend.balance.plan_counts`); the best is solved again with those
    weights and kept if every value is placed alike (:func:`_same_layout`), else the next
    candidate is tried. Ties keep ``sol``; where nothing qualifies, ``sol`` as it is."""
    tp_size = kw["tp_size"]
    cands = [(sol, False)]
    if any(isinstance(p, Shard) and p.units is not None for p in sol.placements.values()):
        # (whole KV groups are only asked for where some split is uneven)
        grouped = _solve_once(graph, group_kv=True, **kw)
        if grouped.demoted != sol.demoted:
            cands.append((grouped, True))
    scored = []
    for i, (cand, group_kv) in enumerate(cands):
        found = balance.plan_counts(cand, tp_size)
        work = found.after if found is not None else balance.rank_work(cand, tp_size)
        log.debug("tp_auto: work balance candidate%s: busiest rank %.3g FLOPs",
                  " (whole KV groups)" if group_kv else "", max(work))
        scored.append((max(work), i, found))
    # (within 0.1 % of the first candidate's work counts as a tie: keep the earlier)
    ref = max(scored[0][0], 1.0)
    scored = [(round(w / ref, 3), i, found) for w, i, found in scored]
    for _, i, found in sorted(scored):
        cand, group_kv = cands[i]
        text = "queries in whole KV groups" if group_kv else ""
        if found is None:
            cand.balance = text
            return cand
        weighted = _solve_once(graph, group_kv=group_kv, counts=found.counts, **kw)
        if not _same_layout(cand, weighted):
            log.info("tp_auto: work balance: the weighted deal changes how values are placed; "
                     "not used")
            continue
        sizes = sorted(set(found.counts.values()))
        weighted.balance = ((text + "; " if text else "") +
                            f"evenly split projections dealt by weight "
                            f"({', '.join('|'.join(map(str, c)) for c in sizes)}): modelled "
                            f"work per rank {_share_text(balance.rank_work(weighted, tp_size))} "
                            f"of the mean, was {_share_text(found.before)}")
        return weighted
    return sol


def _solve_once(graph: fx.Graph, *, tp_size: int, params: set, presharded: dict | None = None,
                max_rounds: int = 64, forced: set = frozenset(),
                veto: frozenset = frozenset(), outputs: str = "gather",
                sequence_parallel: bool = False, lm_head: str = "split",
                group_kv: bool = False, counts: dict | None = None) -> Solution:
    """Assign a placement to every value of ``graph`` (a core-ATen graph).

    Args:
        graph: the decomposed graph; node ``meta["val"]`` holds fake tensors of *global*
            shape.
        tp_size: number of tensor-parallel ranks ``N``.
        params: placeholder nodes that are parameters (may be stored sharded).
        presharded: placeholder -> ``Shard`` for parameters already sharded by an earlier
            compile of the same model; they keep that layout.
        veto: names of seed nodes replicated from the start (the backend's self-check
            vetoes the seeds behind a value whose local shape was wrong).
        group_kv: attention whose query heads split unevenly asks their seed for whole
            KV groups, so that the keys and values split with them (see :func:`solve`).
        counts: seed -> units per rank, for evenly split seeds dealt by weight instead
            (:mod:`tp_backend.balance`).

    Returns:
        a :class:`Solution`. A projection that splits into a number of heads ``tp_size``
        does not divide stays whole, with an :class:`~tp_backend.rules.Indivisible` note.
    """
    t0 = time.perf_counter()
    presharded = presharded or {}
    demoted: set = {n for n in graph.nodes if n.name in veto}
    reduced: set = set()  # Partial values all-reduced right where they are made
    prefs: dict = {}  # seed -> cut points its consumers split its output at
    sequence: dict = {}  # Partial value -> the token Shard it is reduce-scattered to
    head: set = set()  # the LM head's parameters, as found in any round
    head_demoted: set = set()  # seeds kept whole for lm_head="replicate"
    rounds = 0
    indivisible: list = []
    while True:
        rounds += 1
        rnd = _propagate(graph, tp_size, params, presharded, demoted, reduced, prefs, forced,
                         outputs, sequence, sequence_parallel, lm_head == "replicate",
                         frozenset(head), group_kv, counts, rounds < max_rounds)
        head |= rnd.head_params
        head_demoted |= rnd.head_conflicts
        indivisible += [why for _, why in rnd.notes
                        if isinstance(why, Indivisible) and why not in indivisible]
        new = rnd.conflicts - demoted
        new_red = rnd.new_reduced - reduced
        if not new and not new_red and not rnd.new_prefs and not rnd.new_sequence \
                or rounds >= max_rounds:
            break
        if new_red or rnd.new_prefs:
            # Settle where partial sums are reduced and how fused projections are split
            # first: conflicts seen before that may be artefacts of either.
            reduced |= new_red
            prefs.update(rnd.new_prefs)
            continue
        if new:
            for seed in sorted(new, key=lambda n: n.name):
                log.debug("tp_auto: replicating %s (its shard reaches an op that needs it "
                          "whole)", describe(seed))
            demoted |= new
            continue
        # The tensor-parallel placements are settled: sequence parallelism last, on the
        # partial sums they leave (a later round may find more, behind the first ones).
        sequence.update(rnd.new_sequence)
    pl, origin, demands, r_used = rnd.placements, rnd.origin, rnd.demands, rnd.r_used
    sol = Solution(tp_size=tp_size, placements=pl, decisions=rnd.decisions, demoted=demoted,
                   notes=rnd.notes, rounds=rounds, local_outputs=rnd.local_outputs,
                   returned_split=rnd.returned_split,
                   taint=rnd.taint, indivisible=indivisible,
                   sequence_values=rnd.sequence_values, lm_head=head,
                   lm_head_seeds=head_demoted)
    dropped = defaultdict(set)  # parameter -> its dims some value on its chain dropped
    for param, perm in origin.values():
        dropped[param].update(set(range(len(param.meta["val"].shape))) - set(perm))
    for param in params:
        if param in presharded:
            sol.param_storage[param] = presharded[param]
            sol.param_role[param] = Role(role(param))
            continue
        uses = demands.get(param, [])
        wants = {w for w, _ in uses}
        roles = {r for _, r in uses if r}
        size = param.meta["val"].shape
        if uses and param not in r_used and len(wants) == 1:
            want, = wants
            # (every value on the parameter's chain must keep the split dim: a select of
            # one expert along it would index a local shard with a global index)
            if want.splits(int(size[want.dim]), tp_size) and want.dim not in dropped[param]:
                sol.param_storage[param] = want
                # A tied embedding / LM head is vocab-parallel for the lookup and
                # column-parallel for the head: the same split of the [V, E] table.
                if roles == {Role.VOCAB, Role.COLUMN}:
                    roles = {Role.VOCAB}
                sol.param_role[param] = roles.pop() if len(roles) == 1 else Role.SHARD
                continue
        sol.param_storage[param] = None
        sol.param_role[param] = Role.REPLICATE
    # Values on a parameter's layout chain follow the parameter's storage.
    chain = set()
    for node, (param, perm) in origin.items():
        stored = sol.param_storage.get(param)
        if stored is not None:
            pl[node] = stored.moved(perm.index(stored.dim))
            chain.add(node)
    kept = []
    for c in rnd.conversions:
        if c.src in chain:
            have = pl[c.src]
            if have == c.want:
                continue
            c = Conversion(c.node, c.src, have, c.want)
        kept.append(c)
    sol.conversions = kept
    sol.seconds = time.perf_counter() - t0
    return sol
