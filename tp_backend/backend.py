"""The ``tp_auto`` torch.compile backend.

``torch.compile(model, backend="tp_auto", options={"tp_group": g})`` reaches
:data:`tp_auto` through the ``torch_dynamo_backends`` entry point. For each graph Dynamo
captures, the backend

1. validates ``options`` (:mod:`tp_backend.options`);
2. decomposes the graph to functional core ATen on fake tensors of *global* shape
   (:mod:`tp_backend.decompose`);
3. solves a placement for every value (:mod:`tp_backend.solver`) and records the plan
   (:mod:`tp_backend.plan`);
4. rewrites the ATen graph for this rank (:mod:`tp_backend.rewrite`);
5. hands the local graph to the downstream compiler (Inductor by default, on fake inputs
   of this rank's local shapes in Dynamo's fake mode; ``compiler="eager"`` runs it as is);
6. returns a runner that, on its first call, stores the parameters split (this rank's
   slice goes to the store of :mod:`tp_backend.runtime`; ``param.data`` becomes a
   one-element placeholder of the global shape, so Dynamo's guards still hold) and from
   then on runs the local graph with the slices in their place; outputs come back whole
   (all-gathered in the graph), except key/value caches (placeholders carrying this rank's
   part) and, per the ``outputs`` option, split outputs returned as
   :class:`~tp_backend.tp_tensor.TPTensor`.

Solved graphs are cached (keyed by the graph code and the global input shapes), so a
recompile neither re-solves nor re-shards. ``torch._dynamo.reset()`` clears the cache.

Owns: the backend entry, its cache of solved graphs and the runner. Must not: hold split
values itself (:mod:`tp_backend.runtime`), read checkpoint files
(:mod:`tp_backend.checkpoint`), or decide placements (the pipeline).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from . import conjugates, consistency, downstream, layers, nodemeta, selfcheck, shm, state
from .errors import TPError, TPPassError, TPTrainingError
from .options import TPOptions, validate_options
from .placement import Shard
from .naming import NameIndex, roots_of_compiling_frame, roots_of_running_frames
from .pipeline import run_pipeline
from .plan import TPPlan
from .rules import Role
from .tp_tensor import FromLocal, TPTensor, ToLocal
# The runtime state of split values lives in tp_backend.runtime (reached as tp_auto.store);
# its public accessors are re-exported here and from the package.
from .runtime import (SPLIT_ATTR, STORE, ShardInfo, differentiable,  # noqa: F401
                      local_parameter_bytes,
                      local_shard, local_value, placeholders, sharding_info, split_value)

log = logging.getLogger("tp_backend")

__all__ = ["tp_auto", "TPAutoBackend", "sharding_info", "ShardInfo", "local_shard",
           "local_parameter_bytes", "local_value"]


@dataclass
class _Compiled:
    gm: fx.GraphModule
    plan: TPPlan
    shard_specs: list  # [(input index, ShardInfo)]
    replicated_params: list  # input indices of parameters kept whole
    local_inputs: dict  # input index -> Shard of values kept split by an earlier graph
    #                     (except those stored split as state: those are in shard_specs)
    local_outputs: dict  # output index -> Shard of values returned split (KV cache)
    run: object = None  # the local graph, compiled by the downstream compiler (or gm itself)
    labels: dict = dataclasses.field(default_factory=dict)  # input index -> user-facing name
    training: bool = False  # compiled to be differentiated (tp_backend.conjugates)
    # output index -> Shard of outputs returned to Python as TPTensors (the outputs option)
    returned_split: dict = dataclasses.field(default_factory=dict)


class _InferenceOnly(torch.autograd.Function):
    """Identity on a split graph's outputs whose backward raises :class:`TPTrainingError`
    (instead of PyTorch's "no autograd formula" for a leaf op, or a silent gradient of
    zero for the placeholders)."""

    @staticmethod
    def forward(ctx, anchor, *outs):
        return tuple(o.view_as(o) if isinstance(o, torch.Tensor) else o for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        raise TPTrainingError(
            "tp_auto: backward through a tensor-parallel graph is not supported yet: the "
            "graphs tp_auto splits are inference graphs. Run the forward under "
            "torch.no_grad() or torch.inference_mode(); to train, compile without tp_auto "
            "(or use PyTorch's DTensor tensor parallelism) for now.")

    @classmethod
    def wrap(cls, anchor: torch.Tensor, outs):
        """``outs`` (a tuple or list from the local graph) with floating tensors wrapped."""
        kind, outs = type(outs), list(outs)
        idx = [i for i, o in enumerate(outs)
               if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if idx:
            for i, o in zip(idx, cls.apply(anchor, *(outs[i] for i in idx))):
                outs[i] = o
        return tuple(outs) if kind is tuple else outs


def _downstream_compile(gm: fx.GraphModule, local_fakes: list, opts: TPOptions,
                        plan: TPPlan | None = None, static_inputs: tuple = ()):
    """Hand this rank's local ATen graph to the downstream compiler
    (:func:`tp_backend.downstream.compile_local_graph` for Inductor, in ``opts.mode``: a
    collective where ``tp_size > 1``; ``"eager"`` runs the graph as it is, for debugging),
    recording the seconds in ``plan.timings``. ``static_inputs``: indices of the inputs
    whose tensors stay the same from call to call (parameters, their shards, state stored
    split), for CUDA graphs."""
    if opts.compiler != "inductor":
        return gm
    fn, seconds = downstream.compile_local_graph(
        gm, local_fakes, opts.cpu_matmul, opts.tp_group if opts.tp_size > 1 else None,
        mode=opts.mode, static_inputs=static_inputs)
    if plan is not None:
        plan.timings["downstream_compile_s"] = seconds
    return fn


class _ParamCache:
    """The local shards a runner substituted for its parameter inputs on the last call,
    with the inputs' identities: while every input is the same tensor, the next call takes
    the same shards without a lookup per parameter. Holds no parameter alive (weak
    references), and drops the shards as soon as any of those parameters is freed, so
    neither a dropped model's weights stay in memory nor can a new tensor that reuses a
    freed one's ``id`` be mistaken for it."""

    __slots__ = ("ids", "locals", "_refs", "__weakref__")

    def __init__(self, params: tuple, locals_: tuple):
        self.ids = tuple(map(id, params))
        self.locals = locals_
        me = weakref.ref(self)

        def drop(_, me=me):
            cache = me()
            if cache is not None:
                cache.locals = None
        self._refs = [weakref.ref(p, drop) for p in params]


def _tuple_getter(indices):
    """``f(args) -> tuple(args[i] for i in indices)``, through one C-level ``itemgetter``
    (which returns a bare item, not a tuple, for a single index)."""
    indices = tuple(indices)
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


def _contiguous_fake(fake_mode, shape, like: torch.Tensor) -> torch.Tensor:
    with fake_mode:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


class _Runner:
    """What Dynamo calls: shards parameters on first use, then runs the local graph with
    each sharded parameter's local slice in place of the parameter."""

    def __init__(self, compiled: _Compiled, names: NameIndex, opts: TPOptions):
        self.compiled = compiled
        self.plan = compiled.plan
        self._opts = opts
        self._first = True
        # Parameters kept whole here that a graph compiled later split: gathered per call.
        # Rescanned only when a tensor has been split since the last scan.
        self._gather: list = []
        self._shard_count_seen = -1
        c = compiled
        # Inputs every rank must hold alike: all but parameters, state stored split and
        # values kept split by an earlier graph (a KV cache), which differ by design.
        own = {i for i, _ in c.shard_specs} | set(c.replicated_params) | set(c.local_inputs)
        self._checked = [i for i in sorted(c.labels) if i not in own]
        # Names by identity at shard time: Dynamo may run one compiled graph for several
        # modules of the same code (every layer of a model with a graph break inside its
        # layers), so the name and the owner come from the tensor, not from the graph.
        self._names = names
        self._param_idx = tuple(i for i, _ in compiled.shard_specs)
        self._pick_params = _tuple_getter(self._param_idx)
        self._params: _ParamCache | None = None
        # Parameters kept whole whose values are in the store (STORE.whole): the inputs
        # fed those values on the last call, while neither the parameters nor the store
        # have changed since.
        self._whole: _ParamCache | None = None
        self._whole_changes = -1
        self._pick_replicated = _tuple_getter(compiled.replicated_params)
        self._split_out = _split_output_kinds(compiled)

    def _agree(self, args) -> None:
        """The ranks-agree collectives (``sync_rng``, ``check_inputs``), on the calls the
        options name; every rank reaches them on the same calls."""
        opts, first = self._opts, self._first
        self._first = False
        if opts.sync_rng == "always" or first and opts.sync_rng == "first":
            consistency.sync_rng_state(opts.tp_group)
        if opts.check_inputs == "always" or first and opts.check_inputs == "first":
            consistency.check_inputs_agree(
                [(self.compiled.labels[i], args[i]) for i in self._checked
                 if isinstance(args[i], (torch.Tensor, int, float))], opts.tp_group)

    def __call__(self, *args):
        args = list(args)
        # Grad mode with a parameter that wants gradients: the caller may call backward.
        anchor = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad),
                      None) if torch.is_grad_enabled() else None
        self._agree(args)
        # Checked on every call while weights wait to be read: Dynamo may share one compiled
        # graph between several model instances (torch.compile(model.forward) on two
        # models), whose weights load apart. Once all are read, the check is skipped.
        if len(STORE.pending):
            pending = [i for i, _ in self.compiled.shard_specs if args[i] in STORE.pending] + \
                      [i for i in self.compiled.replicated_params if args[i] in STORE.pending]
            if pending:
                self._load(args, pending)
        self._substitute_params(args)
        c = self.compiled
        if STORE.count != self._shard_count_seen:
            self._shard_count_seen = STORE.count
            self._gather = [i for i in c.replicated_params if args[i] in STORE.sharded]
        differentiable = c.training and torch.is_grad_enabled()
        if len(STORE.whole) and c.replicated_params:
            self._substitute_whole(args, differentiable)
        for idx in self._gather:
            # Kept whole here but split by a graph compiled later (a graph that fell back
            # to replicated next to split ones): its placeholder holds no values, so gather
            # the whole tensor for this call (a collective, on every rank).
            args[idx] = (self._gather_differentiable(args[idx]) if differentiable
                         else state.full_tensor(args[idx]))
        for idx, shard in c.local_inputs.items():
            t = args[idx]
            held = t.__dict__.get(SPLIT_ATTR)
            if held is not None:
                args[idx] = held[1]  # contiguous (see _split_outputs)
            else:  # a whole tensor where a split one was expected: take this rank's part
                args[idx] = layers.local_shard(t, shard.dim, shard.outer, c.plan.tp_rank,
                                               c.plan.tp_size, shard.blocks, shard.units,
                                               shard.counts)
        if anchor is not None and c.plan.params and not c.training:
            # Only a graph compiled for training differentiates through its collectives:
            # run any other without recording autograd history, and make backward
            # through its outputs raise a clear error.
            with torch.no_grad():
                outs = c.run(*args)
            outs = _InferenceOnly.wrap(anchor, outs)
        else:
            outs = c.run(*args)
        if c.returned_split:
            outs = self._wrap_returned(list(outs))
        if not c.local_outputs:
            return outs
        return self._split_outputs(list(outs))

    def _wrap_returned(self, outs: list) -> list:
        """Each output the plan returns split (the ``outputs`` option) as a
        :class:`~tp_backend.tp_tensor.TPTensor` of its global shape over the local shard
        (through :class:`~tp_backend.tp_tensor.FromLocal` where autograd records it)."""
        plan = self.compiled.plan
        for idx, shard in self.compiled.returned_split.items():
            local = outs[idx]
            shape = list(local.shape)
            shape[shard.dim] = shard.global_size(shape[shard.dim], plan.tp_rank, plan.tp_size)
            info = ShardInfo(f"output {idx}", shard.dim, Role.SHARD, tuple(shape),
                             plan.tp_rank, plan.tp_size, self._opts.group_name)
            outs[idx] = (FromLocal.apply(local, info) if local.requires_grad
                         else TPTensor(local, info))
        return outs

    def _substitute_params(self, args: list) -> None:
        """Put each sharded parameter's local shard in its place in ``args``; shard the
        ones seen for the first time. While the parameters are the tensors of the last
        call, that call's shards are reused (:class:`_ParamCache`)."""
        specs = self.compiled.shard_specs
        if not specs:
            return
        if self.compiled.training and torch.is_grad_enabled():
            self._substitute_trainable(args)
            return
        params = self._pick_params(args)
        cache = self._params
        if cache is not None and cache.locals is not None and tuple(map(id, params)) == cache.ids:
            for idx, local in zip(self._param_idx, cache.locals):
                args[idx] = local
            return
        for idx, info in specs:
            args[idx] = self._stored(args[idx], info, idx).local
        self._params = _ParamCache(params, self._pick_params(args))

    def _substitute_whole(self, args: list, differentiable: bool) -> None:
        """Feed each parameter kept whole whose value is in the store (``STORE.whole``:
        ``parallelize_model`` read it on the first call; the parameter holds a
        placeholder) that value. A graph differentiated through it makes the parameter
        hold it instead, so its gradient reaches the parameter. While the parameters are
        the tensors of the last call and the store has not changed, that call's values
        are reused without a lookup per parameter (one per layer norm, for example)."""
        replicated = self.compiled.replicated_params
        if differentiable:
            for idx in replicated:
                t = args[idx]
                if t in STORE.whole:  # gradients go to the parameter itself: hold it real
                    with torch.no_grad():
                        t.data = STORE.whole.pop(t)
            return
        cache = self._whole
        params = self._pick_replicated(args)
        if (cache is not None and cache.locals is not None
                and self._whole_changes == STORE.whole.changes
                and tuple(map(id, params)) == cache.ids):
            for idx, whole in cache.locals:
                args[idx] = whole
            return
        fed = []
        for idx, t in zip(replicated, params):
            whole = STORE.whole.get(t)
            if whole is not None:
                args[idx] = whole
                fed.append((idx, whole))
        self._whole = _ParamCache(params, tuple(fed))
        self._whole_changes = STORE.whole.changes

    def _substitute_trainable(self, args: list) -> None:
        """:meth:`_substitute_params` for a training graph called with grad enabled: each
        sharded parameter that requires grad is (on first use) promoted to a
        :class:`~tp_backend.tp_tensor.TPTensor` parameter in its modules
        (:meth:`ShardStore.promote`), and the graph takes its shard through
        :class:`~tp_backend.tp_tensor.ToLocal`, so backward leaves the gradient, this
        rank's slice, in the parameter's own ``.grad``."""
        for idx, info in self.compiled.shard_specs:
            t = args[idx]
            st = self._stored(t, info, idx)
            p = self._promoted(t)
            args[idx] = ToLocal.apply(p) if isinstance(p, TPTensor) else st.local

    def _stored(self, t, info, idx):
        """The store's record of parameter ``t`` (sharded now if this is its first use);
        raises ``TPError`` if an earlier graph split it on another dim."""
        st = STORE.sharded.get(t)
        if st is None:
            return self._shard(t, info, idx)
        if st.info.dim != info.dim:
            raise TPError(f"parameter {info.fqn!r} is sharded on dim {st.info.dim}, but this "
                          f"graph expects dim {info.dim}")
        return st

    def _promoted(self, t):
        found = self._name(t) if not isinstance(t, TPTensor) else None
        return STORE.promote(t, found.holders if found is not None else ())

    def _name(self, t):
        """The name, holders and owner of parameter ``t``. By the index built at compile
        time, else (Dynamo reused this graph for another model of the same code, whose
        tensors that index does not hold) by one of the modules running now."""
        found = self._names.tensor(t)
        if found is None:
            names = NameIndex(roots_of_running_frames())
            if (found := names.tensor(t)) is not None:
                self._names = names
        return found

    def _gather_differentiable(self, t):
        """The whole value of ``t`` (stored split by another graph) for a training graph:
        gathered through the conjugate all-gather, whose backward hands this rank's slice
        of the gradient to the shard."""
        st = STORE.sharded[t]
        p = self._promoted(t)
        x = ToLocal.apply(p) if isinstance(p, TPTensor) else st.local
        info = st.info
        whole = conjugates.gather(x, info.dim, info.outer, info.tp_rank, info.tp_size,
                                  info.group_name, list(info.blocks) if info.blocks else None,
                                  info.units, counts=list(info.counts) if info.counts else None)
        real = info.global_shape[info.dim]
        return whole.narrow(info.dim, 0, real) if whole.shape[info.dim] != real else whole

    def _split_outputs(self, outs: list) -> tuple:
        """Replace each output returned split over heads by a :func:`placeholder` of its
        global shape that carries the local tensor (``SPLIT_ATTR``). A local tensor is
        stored contiguous: the graphs that take it back were compiled for contiguous
        inputs (a prefill returns its keys transposed; later steps return contiguous
        ones). The placeholders of one shape, dtype and device (the keys and values of
        every layer, in a decode step) are made in one call. Outputs of one kind (split
        dim, dtype and device: fixed for the graph) that are all contiguous and of one
        shape, as on every decode step, are one batch without grouping them one by one."""
        for indices, shards, pick in self._split_out:
            locals_ = pick(outs)
            if (all(map(_is_contiguous, locals_))
                    and len(set(map(_shape_of, locals_))) == 1):
                self._attach(outs, indices, shards, locals_)
                continue
            # Shapes that differ (sliding-window layers) or a transposed layout (a prefill's
            # keys): grouped by shape, one batch of placeholders per shape.
            groups: dict = {}
            for idx, shard, local in zip(indices, shards, locals_):
                if not local.is_contiguous():
                    local = local.contiguous()
                groups.setdefault(local.shape, []).append((idx, shard, local))
            for members in groups.values():
                self._attach(outs, *zip(*members))
        return tuple(outs)

    def _attach(self, outs: list, indices, shards, locals_) -> None:
        """Put in ``outs[indices[k]]`` a placeholder of the global shape carrying
        ``(shards[k], locals_[k])``, for local tensors of one shape, dtype and device: the
        placeholders made in one call."""
        plan = self.compiled.plan
        first, shard = locals_[0], shards[0]
        shape = list(first.shape)
        shape[shard.dim] = shard.global_size(shape[shard.dim], plan.tp_rank, plan.tp_size)
        for idx, shard, local, ph in zip(indices, shards, locals_, placeholders(
                len(indices), shape, first.dtype, first.device)):
            ph.__dict__[SPLIT_ATTR] = (shard, local)
            outs[idx] = ph

    def _shard(self, t, info, idx, local=None):
        """Store ``t`` split as ``info`` says (:meth:`ShardStore.record`): ``local`` if
        given (read from a checkpoint), else the part an earlier graph returned split,
        else this rank's slice of ``t``'s data."""
        held = t.__dict__.pop(SPLIT_ATTR, None)
        if local is None and held is not None:  # returned split by an earlier graph
            local = held[1]
        if local is None:
            if tuple(t.shape) != info.global_shape:
                raise TPError(f"parameter {info.fqn!r} has shape {list(t.shape)}; tp_auto "
                              f"expected {list(info.global_shape)}")
            with torch.no_grad():
                # nn.Linear's weight is (out_features, in_features): a split on dim 0 is
                # column-parallel, on dim 1 row-parallel; an embedding's (V, E) table split
                # on dim 0 is vocab-parallel. A fused [q|k|v] weight is split per block.
                whole = STORE.whole.pop(t, None)
                local = info.local_of(whole if whole is not None else t.detach()).clone()
        return STORE.record(t, info, local, self._name(t))

    def _load(self, args, indices):
        """Read the weights ``parallelize_model`` left in the checkpoint
        (:func:`tp_backend.checkpoint.load_pending`); the split ones are stored split."""
        from .checkpoint import load_pending

        load_pending([(i, args[i]) for i in indices], dict(self.compiled.shard_specs),
                     STORE.pending, STORE.whole, self._shard)


def _split_output_kinds(compiled: _Compiled) -> list:
    """``[(output indices, their Shards, picker)]``, one entry per kind of output returned
    split, where outputs of one kind have the same split dim, dtype and device in every
    call (from the local graph's output values; an output it gives none for is a kind of
    its own); ``picker(outs)`` is the tuple of that kind's outputs."""
    outs = compiled.gm.graph.output_node().args[0] if compiled.local_outputs else ()
    kinds: dict = {}
    for idx, shard in compiled.local_outputs.items():
        val = outs[idx].meta.get("val") if isinstance(outs[idx], fx.Node) else None
        key = ((shard.dim, val.dtype, val.device) if isinstance(val, torch.Tensor)
               else ("output", idx))
        kinds.setdefault(key, []).append((idx, shard))
    return [(tuple(i for i, _ in members), tuple(s for _, s in members),
             _tuple_getter(i for i, _ in members)) for members in kinds.values()]


_is_contiguous = torch.Tensor.is_contiguous
_shape_of = operator.attrgetter("shape")


class TPAutoBackend:
    """The ``tp_auto`` backend: a callable ``(gm, example_inputs, options=None)``.

    Keyword Args:
        options (dict): ``tp_group`` (a ``ProcessGroup``; default: the default group),
            ``compiler`` (``"inductor"``, the default, or ``"eager"``), ``mode``
            (Inductor's compile mode), ``cpu_matmul`` (``"onednn"``, the default, or
            ``"aten"``), and the others of :data:`tp_backend.options.OPTION_DOCS`. Unknown
            keys raise ``ValueError``.
        mode (str): what ``torch.compile(..., mode=...)`` passes (it allows no
            ``options`` beside it): the same as ``options={"mode": mode}``.

    Attributes:
        stats: counters -- ``graphs`` (backend calls), ``solves``, ``cache_hits``.
        plans: the :class:`~tp_backend.plan.TPPlan` of every solved graph, in order.
        store: the process's :class:`~tp_backend.runtime.ShardStore` (parameters and
            state stored split, weights still in the checkpoint).
    """

    def __init__(self):
        self.store = STORE  # what this process holds split (tp_backend.runtime)
        self._cache: dict = {}
        self.stats = {"graphs": 0, "solves": 0, "cache_hits": 0}
        self.plans: list[TPPlan] = []

    def reset(self) -> None:
        """Forget cached graphs and plans (called by ``torch._dynamo.reset()``)."""
        self._cache.clear()
        self.plans.clear()
        for k in self.stats:
            self.stats[k] = 0

    def __call__(self, gm: fx.GraphModule, example_inputs, options=None, mode=None, **kwargs):
        if kwargs:
            raise TypeError(f"tp_auto got unexpected arguments {sorted(kwargs)}; pass "
                            "settings through torch.compile(..., options={...})")
        if mode is not None:  # torch.compile(..., mode=...): it takes no options beside it
            options = ({"mode": mode} if options is None else
                       {**options, "mode": mode} if isinstance(options, Mapping) else options)
        opts = validate_options(options)
        self.stats["graphs"] += 1
        if opts.tp_size == 1:  # nothing to split: the graph goes to the downstream compiler
            if opts.compiler == "inductor":
                return _downstream_compile(gm, list(example_inputs), opts)
            return gm.forward
        return self._compile(gm, list(example_inputs), opts)

    # ------------------------------------------------------------------ compile
    def _compile(self, gm, example_inputs, opts: TPOptions):
        # A collective on every rank (each compiles the same graphs in the same order); the
        # answer is cached per group after the first graph.
        use_shm = shm.setup(opts.tp_group, opts.all_reduce)
        layers.register_rank(opts.group_name, opts.tp_rank)  # read by graphs as they run
        # As AOTAutograd decides: a graph that may be differentiated is compiled for
        # training (Dynamo guards on grad mode and on requires_grad, so the inference graph
        # and the training graph of one model are compiled apart).
        training = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fakes, params, presharded, local_in = [], set(), {}, {}
        fqns, buffer_names, aliases = {}, {}, {}
        ex_fake = next(n.meta["example_value"] for n in placeholders
                       if isinstance(n.meta.get("example_value"), torch.Tensor))
        fake_mode = ex_fake.fake_mode
        # Names by identity: the example inputs are the model's own tensors.
        names = NameIndex(*roots_of_compiling_frame())
        names.use([t for t in example_inputs if isinstance(t, torch.Tensor)])
        for i, (n, real) in enumerate(zip(placeholders, example_inputs)):
            fake = n.meta.get("example_value")
            found = names.tensor(real) if isinstance(real, torch.Tensor) else None
            if found is not None:
                buffer_names[i], aliases[i] = found.name, found.aliases
            if isinstance(real, torch.nn.Parameter):
                params.add(i)
                if found is None:
                    log.warning("tp_auto: no module reachable from the compiled frame holds "
                                "parameter input %s; it is named after the graph input", n.name)
                fqns[i] = buffer_names.pop(i, n.name)
            # Inputs whose data is a placeholder are traced as contiguous tensors of their
            # global shape.
            st = STORE.sharded.get(real) if isinstance(real, torch.Tensor) else None
            if st is not None:  # a parameter, or state, that an earlier graph stored split
                info = st.info
                if info.group_name != opts.group_name:
                    raise TPError(f"{info.fqn!r} was sharded for another tensor-parallel group "
                                  f"({info.group_name})")
                presharded[i] = info
                fqns.setdefault(i, info.fqn)
                params.add(i)
                fake = _contiguous_fake(fake_mode, info.global_shape, real)
            elif isinstance(real, torch.Tensor) and (real in STORE.pending
                                                     or real in STORE.whole):
                fake = _contiguous_fake(fake_mode, real.shape, real)
            elif isinstance(real, torch.Tensor) and (held := split_value(real)) is not None:
                local_in[i] = held[0]
                fake = _contiguous_fake(fake_mode, fake.shape, fake)
            fakes.append(fake)
        # The thread count too: Inductor's CPU kernels are specialised on it (its own cache
        # keys on it), so a graph compiled under 1 thread is not reused under 4.
        # Inductor's settings too (a digest of torch._inductor.config, as Inductor's own
        # cache keys on it): a graph compiled before a setting changed is not reused after.
        inductor_config = (torch._inductor.config.get_hash() if opts.compiler == "inductor"
                           else None)
        key = (gm.code, training, opts.compiler, opts.mode, opts.cpu_matmul, opts.group_name,
               use_shm, opts.tp_rank, opts.outputs, opts.sequence_parallel, opts.lm_head,
               opts.balance, torch.get_num_threads(), tuple(sorted(local_in.items(), key=str)),
               # (strides too: Dynamo recompiles for an input of another layout, e.g. a
               # key/value cache that is a transposed view after the prefill and contiguous
               # after a decode step's cat, and the downstream compile assumes its strides)
               tuple((tuple(str(d) for d in f.shape), tuple(str(d) for d in f.stride()),
                      f.dtype) if isinstance(f, torch.Tensor) else str(f) for f in fakes),
               tuple(sorted(params)), inductor_config)
        compiled = self._cache.get(key)
        if compiled is not None:
            self.stats["cache_hits"] += 1
            log.debug("tp_auto: graph %s found in the cache", gm.meta.get("dynamo_compile_id"))
            return _Runner(compiled, names, opts)
        failed = None
        try:
            compiled, local_fakes = self._solve_and_rewrite(
                gm, fakes, fake_mode, params, presharded, fqns, opts, local_in, aliases, names,
                buffer_names, use_shm, training, example_inputs)
        except TPPassError as e:
            if opts.fallback == "raise":
                raise
            failed = e
        # Every rank takes the same branch (a rank running the graph split while another
        # runs it whole would wait forever in a collective), before the downstream compile
        # (a collective of its own where ranks of a host share a graph).
        if consistency.any_rank(failed is not None, opts.tp_group):
            compiled = self._replicated(gm, fakes, params, opts, names, failed,
                                        bool(presharded or local_in))
        else:
            # The runner hands the local graph the same tensor for each of these on
            # every call (the store's shards, parameters kept whole).
            static = sorted({i for i, _ in compiled.shard_specs}
                            | set(compiled.replicated_params))
            compiled.run = _downstream_compile(compiled.gm, local_fakes, opts, compiled.plan,
                                               tuple(static))
        self._cache[key] = compiled
        return _Runner(compiled, names, opts)

    def _replicated(self, gm, fakes, params, opts, names, error, split_inputs):
        """The graph as Dynamo captured it, run unsplit on every rank (``fallback=
        "replicate"``): its parameters stay whole (or are read whole), so it costs the
        memory of one process, never a wrong number. Raises if an earlier graph already
        split some of its inputs (they cannot be made whole here). ``fakes``: the inputs
        as the runner feeds them (a parameter whose placeholder stands for values in the
        store or the checkpoint as a contiguous tensor of its shape), for the downstream
        compile."""
        where = _graph_modules(gm, names)
        what = (f"the {error.pass_name} pass failed on the graph of {where}: {error.detail}"
                if error is not None else
                f"another rank of the tp_group could not split the graph of {where}")
        if split_inputs:
            raise TPError(f"tp_auto: {what}; the graph cannot run replicated because an "
                          "earlier graph already split some of its inputs. Pass "
                          "options={'fallback': 'raise'} to see the error at once.") from error
        log.warning("tp_auto: %s. This graph runs replicated: its %d parameters stay whole on "
                    "every rank (no memory saved for them). options={'fallback': 'raise'} "
                    "raises instead.", what, len(params))
        labels = _input_labels(gm, {})
        run = (_downstream_compile(gm, list(fakes), opts)
               if opts.compiler == "inductor" else gm.forward)
        plan = TPPlan(tp_size=opts.tp_size, tp_rank=opts.tp_rank)
        return _Compiled(gm, plan, [], sorted(params), {}, {}, run, labels)

    def _solve_and_rewrite(self, gm, fakes, fake_mode, params, presharded, fqns, opts, local_in,
                           aliases, names: NameIndex, buffer_names: dict, use_shm: bool,
                           training: bool, example_inputs: list):
        """Solve, rewrite and self-check the graph for this rank: returns its
        :class:`_Compiled` (``run`` not set yet: the caller compiles once every rank has
        agreed the graph runs split) and the fake inputs of this rank's local shapes."""
        pre = {i: Shard(info.dim, info.outer, info.blocks, info.units, info.counts)
               for i, info in presharded.items()}
        pre.update(local_in)
        # State the graph writes into is named like a buffer; inputs that are neither
        # (a static KV cache) are labelled with Dynamo's description of the input, shown as
        # is (never parsed).
        labels = _input_labels(gm, buffer_names)
        veto: set = set()
        all_params, all_local_in = params, local_in
        while True:
            aten_gm, sol, plan = run_pipeline(
                gm, fakes, fake_mode, params=all_params, fqns=fqns, presharded=pre,
                tp_size=opts.tp_size, tp_rank=opts.tp_rank, group_name=opts.group_name,
                use_shm=use_shm, training=training,
                roles={i: info.layout for i, info in presharded.items()},
                stateful_names=labels, aliases=aliases,
                module_path=lambda n: names.module_path(n, gm), veto=frozenset(veto),
                strict_divisibility=opts.fallback == "raise",
                outputs=_outputs_mode(opts.outputs, training),
                sequence_parallel=opts.sequence_parallel, lm_head=opts.lm_head,
                balance=opts.balance)
            self.stats["solves"] += 1
            specs = []
            for node, s in sol.param_storage.items():
                i = nodemeta.input_index(node)
                if s is not None:
                    specs.append((i, ShardInfo(sol.stored_inputs.get(i, node.name), s.dim,
                                               sol.param_role[node],
                                               tuple(int(d) for d in node.meta["val"].shape),
                                               opts.tp_rank, opts.tp_size, opts.group_name,
                                               s.outer, s.blocks, sol.param_padding.get(node),
                                               s.units, s.counts)))
            specs.sort(key=lambda x: x[0])
            sharded = {i for i, _ in specs}
            params = set(all_params) | set(sol.stored_inputs)
            local_in = {i: s for i, s in all_local_in.items() if i not in sharded}
            local_fakes = _local_fakes(fakes, fake_mode, dict(specs), local_in, opts.tp_size,
                                       opts.tp_rank)
            if training:  # the local inputs want gradients where the real ones do
                local_fakes = [f.requires_grad_(True) if _wants_grad(f, real) else f
                               for f, real in zip(local_fakes, example_inputs)]
            t0 = time.perf_counter()
            failure = None
            try:
                selfcheck.check_local_graph(aten_gm, sol, local_fakes, fake_mode, opts.tp_size,
                                            opts.tp_rank)
            except TPPassError as e:
                failure = e
            if _uneven(sol):
                # The ranks' local shapes differ, so may their self-checks: every rank
                # vetoes what any rank found (the plans must stay the same).
                failure = _agree_on_failure(failure, opts)
            if failure is not None:
                # Veto the seeds whose split reached the bad value and solve again: a
                # correct, partly replicated graph. No new seed to blame: give up (the
                # caller falls back to running the graph replicated).
                blame = {k: v for k, v in failure.seeds.items() if k not in veto}
                if not blame:
                    raise failure
                log.warning("tp_auto: self-check: %s. Replicating %s and solving again.",
                            failure.detail, ", ".join(blame[k] for k in sorted(blame)))
                veto |= set(blame)
                continue
            plan.timings["self_check_s"] = time.perf_counter() - t0
            plan.vetoed = sorted(veto)
            break
        self.plans.append(plan)
        return _Compiled(aten_gm, plan, specs, [i for i in sorted(params) if i not in sharded],
                         local_in, dict(sol.local_outputs), None, labels, training,
                         dict(sol.returned_split)), local_fakes


def _outputs_mode(option: str, training: bool) -> str:
    """The solver's ``outputs`` mode for the ``outputs`` option: ``"auto"`` keeps the logits
    split in a graph compiled for training that computes its own vocab-parallel loss (a
    ``labels`` forward), and gathers them everywhere else."""
    if option == "auto":
        return "split_with_loss" if training else "gather"
    return option


def _wants_grad(fake, real) -> bool:
    return (isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor)
            and real.requires_grad and differentiable(fake))


def _uneven(sol) -> bool:
    """Whether a value of the solution is split unevenly (its local shape depends on the
    rank)."""
    return any(isinstance(p, Shard) and p.units is not None for p in sol.placements.values())


def _agree_on_failure(failure: TPPassError | None, opts) -> TPPassError | None:
    """The self-check failures of every rank of the group, merged (one all-gather of the
    blamed seeds' names, which are the same on every rank: the graph is)."""
    mine = (failure.detail, dict(failure.seeds)) if failure is not None else None
    found = [None] * opts.tp_size
    dist.all_gather_object(found, mine, group=opts.tp_group)
    found = [f for f in found if f is not None]
    if not found:
        return None
    if failure is not None:
        for _, seeds in found:
            failure.seeds.update(seeds)
        return failure
    detail, seeds = found[0]
    for _, more in found[1:]:
        seeds.update(more)
    msg = f"tp_auto: self-check (on another rank): {detail}"
    return TPPassError(msg, "self-check", f"(on another rank) {detail}", seeds=seeds)


def _input_labels(gm: fx.GraphModule, buffer_names: dict) -> dict:
    """Input index -> the name shown for it: a buffer's name, else Dynamo's description of
    the input, shown as is (never parsed)."""
    return {i: buffer_names.get(i) or (n.meta["grapharg"].source.name
                                       if n.meta.get("grapharg") else n.name)
            for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}


def _graph_modules(gm: fx.GraphModule, names: NameIndex) -> str:
    """The first and last module a captured graph runs in, for messages."""
    paths = [names.module_path(n, gm) for n in gm.graph.nodes if n.op == "call_function"]
    paths = [p for p in paths if p] or ["<root>"]
    return repr(paths[0]) if paths[0] == paths[-1] else f"{paths[0]!r} ... {paths[-1]!r}"


def _local_fakes(fakes: list, fake_mode, specs: dict, local_in: dict, tp_size: int,
                 tp_rank: int = 0) -> list:
    """Fake inputs of the local graph: a sharded parameter or stored state has its local
    shard's shape (the padded size / N on the split dim), a value kept split its local
    part's; other inputs are as Dynamo traced them. Detached (a training graph's caller
    marks the ones that want gradients)."""
    out = []
    for i, f in enumerate(fakes):
        if not isinstance(f, torch.Tensor):
            out.append(f)
            continue
        shape = list(f.shape)
        if i in specs:
            info = specs[i]
            shape[info.dim] = sum(n for _, n in info.ranges())
        elif i in local_in:
            s = local_in[i]
            shape[s.dim] = s.local_size(int(shape[s.dim]), tp_rank, tp_size)
        else:
            out.append(f.detach())
            continue
        out.append(_contiguous_fake(fake_mode, shape, f))
    return out


tp_auto = TPAutoBackend()
