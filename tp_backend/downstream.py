"""The downstream compile of each rank's local graph (Inductor by default), kept cacheable.

Inductor caches what it compiles on disk (AOTAutograd's cache and its FX-graph cache, both on
by default, in ``TORCHINDUCTOR_CACHE_DIR``), so a graph compiled once loads in about a second
the next time: in the next process that runs the same model, and in another rank of the same
host whose local graph is the same. Two things in a local graph would stop that, and this
module handles both:

* **tp_backend's own graph functions** (the collectives of :mod:`tp_backend.collectives`, the
  vocab-parallel lookup of :mod:`tp_backend.layers`, ...) are plain Python functions that
  AOTAutograd traces through. AOTAutograd only caches graphs whose functions it knows are
  pure, so each one the graph calls is declared cacheable through Inductor's documented
  setting ``unsafe_marked_cacheable_functions``, keyed by a digest of tp_backend's source:
  editing tp_backend invalidates the entries.
* **The decomposition table** of :mod:`tp_backend.cpu_matmul` is part of the cache key, and
  Inductor's table holds C++ functions that cannot be pickled: the table pickles as the call
  that builds it (``cpu_matmul.decompositions(kernel)``) plus the same digest.

**Compile once per host.** Where a host runs more ranks than it has CPUs and its ranks have
the same local graph (the common case: an even split, where the graphs read their rank when
they run rather than holding it as a constant), the lowest of them compiles first while the
others wait, and the others then load its result from the cache instead of compiling the
same graph again on the same CPUs. Ranks whose graphs differ (an uneven split) compile at
once, as do the ranks of a host with a CPU for each (side by side they take the time of one
compile; later runs load every rank's graph from the cache). This needs
Inductor's caches on, and a cache directory the ranks of a host share (the default,
``/tmp/torchinductor_<user>``, is).

Caching is Inductor's: ``torch._inductor.config.fx_graph_cache = False`` (or
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``) turns it off, and the compiled code is the same
either way.

**Compile modes.** Inductor's ``mode`` (``tp_auto``'s option of that name) applies as for
``backend="inductor"``: its settings (``torch._inductor.list_mode_options(mode)``) patch the
compile. Under CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``) Inductor is told which
inputs of the local graph are the same tensor on every call (parameters, their shards, state
stored split), so it records them at their addresses rather than copying them on each call.

Owns: calling the downstream compiler on a local graph (in the mode asked for), what makes
that call cacheable, and the order in which the ranks of a host compile.
Must not: decide placements or rewrite graphs (the pipeline), or choose matmul kernels
(:mod:`tp_backend.cpu_matmul` does; this module only passes its table on).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
import time
import types

import torch
import torch.distributed as dist
import torch.fx as fx

from . import cpu_matmul
from .shm import crowded_hosts, where_am_i

__all__ = ["compile_local_graph", "source_digest", "caches_enabled"]

log = logging.getLogger("tp_backend")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """A hex digest of every ``.py`` file of the installed tp_backend package (names and
    bytes): part of the key of every cache entry whose behaviour depends on tp_backend's
    code."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:32]


def _graph_functions(gm: fx.GraphModule) -> dict[str, str]:
    """``unsafe_marked_cacheable_functions`` entries for the tp_backend Python functions
    ``gm`` calls (found by identity: the nodes' targets), each keyed by
    :func:`source_digest`."""
    found = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, types.FunctionType) \
                and (target.__module__ or "").split(".")[0] == __name__.split(".")[0]:
            found[f"{target.__module__}.{target.__name__}"] = source_digest()
    return found


class _DecompositionTable(dict):
    """:func:`tp_backend.cpu_matmul.decompositions` ``(kernel)``, pickled (into Inductor's
    cache keys) as the call that builds it and :func:`source_digest`: Inductor's own table
    holds C++ functions, which cannot be pickled."""

    def __init__(self, kernel: str, digest: str):
        super().__init__(cpu_matmul.decompositions(kernel))
        self.kernel, self.digest = kernel, digest

    def __reduce__(self):
        return _DecompositionTable, (self.kernel, self.digest)


def caches_enabled() -> bool:
    """Whether Inductor's AOTAutograd and FX-graph caches (both needed to load a compiled
    graph) are on in this process."""
    return (bool(torch._inductor.config.fx_graph_cache)
            and bool(torch._functorch.config.enable_autograd_cache)
            and not torch.compiler.config.force_disable_caches)


def _graph_digest(gm: fx.GraphModule, local_fakes: list, how: tuple) -> str:
    """A digest of what a rank hands Inductor: the graph's code, its inputs' shapes,
    strides, dtypes and devices, ``how`` (the matmul kernel, the mode, the static inputs)
    and the thread count. Ranks with equal
    digests compile the same graph (it only orders the compiles: what a rank loads from the
    cache is decided by Inductor's own key)."""
    h = hashlib.sha256(gm.code.encode())
    for f in local_fakes:
        meta = ((tuple(map(str, f.shape)), tuple(map(str, f.stride())), str(f.dtype),
                 str(f.device), f.requires_grad) if isinstance(f, torch.Tensor) else repr(f))
        h.update(repr(meta).encode())
    h.update(f"{how}/{torch.get_num_threads()}".encode())
    return h.hexdigest()


def _compile_turn(gm: fx.GraphModule, local_fakes: list, how: tuple, tp_group) -> str | None:
    """This rank's turn: ``"wait"`` where its host has more ranks than CPUs and a lower rank
    of the host has the same local graph (it compiles after that one, from the cache),
    ``"first"`` where some rank of the group waits (this one compiles, then releases them),
    ``None`` where no rank waits (no host is oversubscribed, no two ranks of one share a
    graph, or some rank has Inductor's caches off). A collective: every rank of
    ``tp_group`` calls it for the same captured graph.

    Why only oversubscribed hosts: where each rank has a CPU of its own, the ranks' compiles
    run side by side in the time of one, and waiting for another rank's compile only adds
    the load (measured on 2 cores: the same first output at TP=2 for the 258M Llama of
    ``benchmarks/first_output.py``, 3 s later for the tiny test Llama); at TP=3 on 2 cores
    it saves a fifth of the first output."""
    mine = (caches_enabled(), where_am_i(), _graph_digest(gm, local_fakes, how))
    everyone = [None] * dist.get_world_size(tp_group)
    dist.all_gather_object(everyone, mine, group=tp_group)
    if not all(e[0] for e in everyone):
        return None
    crowded = crowded_hosts([e[1] for e in everyone])
    graphs = [(e[1][0], e[2]) for e in everyone]
    waits = [crowded[g[0]] and graphs.index(g) != r for r, g in enumerate(graphs)]
    if not any(waits):
        return None
    return "wait" if waits[dist.get_rank(tp_group)] else "first"


def compile_local_graph(gm: fx.GraphModule, local_fakes: list, cpu_matmul_kernel: str,
                        tp_group=None, mode: str = "default", static_inputs: tuple = ()):
    """Compile ``gm`` (a rank's local ATen graph) with Inductor, as ``backend="inductor"``
    does with a captured graph, and return the compiled callable and the seconds it took
    (not counting a wait for another rank).

    ``local_fakes``: fake tensors of the shapes this rank really feeds (local shards), in
    Dynamo's fake mode, so Inductor shares Dynamo's symbolic shapes and guards. The
    functional collectives in the graph are lowered by Inductor (``_c10d_functional``);
    float32 CPU matmuls go to the kernel ``cpu_matmul_kernel`` names
    (:mod:`tp_backend.cpu_matmul`). The compile reads and writes Inductor's on-disk caches
    (see the module docstring).

    ``mode``: Inductor's compile mode (``torch.compile``'s ``mode=`` for
    ``backend="inductor"``: its settings are ``torch._inductor.list_mode_options(mode)``).
    ``static_inputs``: indices of inputs whose tensor is the same on every call (parameter
    shards, state stored split): where the mode turns CUDA graphs on, Inductor records
    them at their own addresses instead of copying them into the graph's memory on each
    call, as it does with a model's parameters under ``backend="inductor"``.

    ``tp_group``: the group whose ranks compile their local graphs of one captured graph
    now. Ranks of one host with the same local graph compile one after the other (module
    docstring). A collective then (one all-gather and one barrier): every rank of the group
    calls it, for the same captured graph. ``None``: compile at once.

    Raises: whatever Inductor raises; a rank that compiles first raises only after the
    ranks waiting for it have been released.
    """
    how = (cpu_matmul_kernel, mode, tuple(static_inputs))
    turn = None if tp_group is None else _compile_turn(gm, local_fakes, how, tp_group)
    if turn is None:
        return _compile(gm, local_fakes, *how)
    if turn == "wait":
        t0 = time.perf_counter()
        dist.barrier(group=tp_group)  # released once the other ranks have compiled
        log.debug("tp_auto: waited %.1f s for a rank of this host to compile the same "
                  "graph; loading it from Inductor's cache", time.perf_counter() - t0)
        return _compile(gm, local_fakes, *how)
    try:
        return _compile(gm, local_fakes, *how)
    finally:
        dist.barrier(group=tp_group)


def _compile(gm: fx.GraphModule, local_fakes: list, cpu_matmul_kernel: str,
             mode: str = "default", static_inputs: tuple = ()):
    from torch._inductor.compile_fx import compile_fx

    digest = source_digest()
    marked = dict(torch._inductor.config.unsafe_marked_cacheable_functions)
    marked.update(_graph_functions(gm))
    # AOTAutograd's cache key holds Inductor's settings but not the decomposition table:
    # this entry puts the kernel choice in it (the name is the table's builder).
    marked[f"{cpu_matmul.__name__}.decompositions"] = f"{cpu_matmul_kernel}-{digest}"
    patches = {**torch._inductor.list_mode_options(mode),
               "unsafe_marked_cacheable_functions": marked}
    t0 = time.perf_counter()
    fn = compile_fx(gm, local_fakes, config_patches=patches,
                    inner_compile=_StaticInputs(local_fakes, static_inputs),
                    decompositions=_DecompositionTable(cpu_matmul_kernel, digest))
    return fn, time.perf_counter() - t0


class _StaticInputs:
    """Inductor's inner compile (``compile_fx_inner``), told which inputs of the graph it
    compiles are static for CUDA graphs: the positions ``static`` of the local graph's
    inputs ``fakes``, besides the ones Inductor finds itself.

    Inductor only reads this where CUDA graphs are on (``mode="reduce-overhead"`` or
    ``"max-autotune"``): it records a static input at its own address, re-recording if the
    address changes, where it would copy any other input into the graph's memory on each
    call. ``backend="inductor"`` gets the same for a model's parameters from Dynamo's
    marks on them; ``tp_auto``'s local graph takes parameter shards Dynamo never saw.

    AOTAutograd hands the inner compile new fake tensors for the inputs, in the graph's
    order unless it added or merged inputs. So the positions are used only where the
    inputs it hands over line up with ``fakes`` (as many, and at each static position the
    same dtype and shape); else the list is left as Inductor made it, which costs a copy
    of those inputs per call, never a wrong result. Without CUDA graphs the list is left
    alone too (the FX-graph cache keys on it)."""

    def __init__(self, fakes: list, static: tuple):
        self.fakes, self.static = fakes, tuple(static)

    def _lined_up(self, example_inputs) -> bool:
        def sig(t):
            return (t.dtype, tuple(map(str, t.shape))) if isinstance(t, torch.Tensor) else None

        return len(example_inputs) == len(self.fakes) and all(
            sig(self.fakes[i]) is not None and sig(example_inputs[i]) == sig(self.fakes[i])
            for i in self.static)

    def __call__(self, gm, example_inputs, **kwargs):
        from torch._inductor import compile_fx as inductor

        if self.static and torch._inductor.config.triton.cudagraphs \
                and not kwargs.get("is_backward"):  # (a backward's inputs are its own)
            if self._lined_up(example_inputs):
                kwargs["static_input_idxs"] = sorted(
                    set(kwargs.get("static_input_idxs") or ()) | set(self.static))
            else:
                log.info("tp_auto: the graph Inductor compiles has other inputs than the local "
                         "graph (%d against %d); its CUDA graphs copy the parameter shards "
                         "on each call", len(example_inputs), len(self.fakes))
        return inductor.compile_fx_inner(gm, example_inputs, **kwargs)
