"""The rewrite: a solved global ATen graph -> this rank's local ATen graph.

``rewrite(gm, solution, ...)`` applies a :class:`~tp_backend.solver.Solution` in place:

* arguments that hold global sizes become this rank's local sizes (``view(x, [B, S, 9,
  64])`` -> ``view(x, [B, S, 3, 64])`` at TP=3), from the solved placements
  (:func:`tp_backend.local_args.local_args`);
* redistributions are inserted on the edges the solver marked: a local slice of a
  replicated value, an all-reduce of a partial sum (a reduce-scatter where it is wanted
  split: sequence parallelism), an all-gather of a shard; each is
  inserted once per (value, placement) and reused by later consumers;
* vocab-parallel embeddings and row-parallel ``addmm`` become the layer functions of
  :mod:`tp_backend.layers`;
* attention in a graph that is not differentiated calls ``tp_backend::sdpa_inference``,
  the same kernel without a backward (:mod:`tp_backend.leaf_ops`).

With ``training=True`` (a graph that will be differentiated) the redistributions are the
differentiable ops of :mod:`tp_backend.conjugates` instead, and a replicated floating value
that enters an op whose output is split or partial goes through ``conjugates.copy``
(identity forward, all-reduce backward), once per value.

Sharded parameters need no graph change: their placeholders receive the local shard.

Owns: :func:`rewrite` (local arguments set, conversions inserted once per value and
placement, :class:`~tp_backend.rules.Action` nodes replaced by layer calls), the list of
inserted collectives it returns, and :func:`layer_index`. Must not: decide placements or
conversions (:mod:`tp_backend.rules`, :mod:`tp_backend.solver`), compute local argument
values (:mod:`tp_backend.local_args`), or implement what it inserts
(:mod:`tp_backend.collectives`, :mod:`tp_backend.layers`).
"""

from __future__ import annotations

import operator
import re
from collections import Counter, defaultdict

import torch
import torch.fx as fx

from . import (collectives, conjugates, layers, leaf_ops, nodemeta, rng,  # noqa: F401 (ops)
               vocab_loss)
from .local_args import local_args
from .placement import Collective, HeadGroup, Partial, Replicate
from .rules import Action, arg
from .runtime import differentiable
from .solver import Solution

aten = torch.ops.aten

__all__ = ["rewrite", "layer_index"]

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_path: str) -> int | None:
    """The repeated-block index in a module path: ``model.layers.3.mlp`` -> 3."""
    m = _LAYER.search(module_path or "")
    return int(m.group(1)) if m else None


def rewrite(gm: fx.GraphModule, sol: Solution, *, tp_rank: int, tp_size: int,
            group_name: str, use_shm: bool = False,
            training: bool = False) -> tuple[fx.GraphModule, list[dict]]:
    """Rewrite ``gm`` for rank ``tp_rank``; all-reduces (and small all-gathers) use the
    shared-memory kernel where ``use_shm`` (:mod:`tp_backend.shm`); ``training`` inserts the
    differentiable redistributions of :mod:`tp_backend.conjugates`. Returns the module and
    the list of inserted collectives (``{"kind", "module", "layer", "shape"}`` each, in
    graph order; forward only)."""
    graph = gm.graph
    by_node = defaultdict(list)
    for c in sol.conversions:
        by_node[c.node].append(c)
    cache: dict = {}
    replaced: dict = {}  # nodes swapped for a layer call -> their replacement
    inserted: list[dict] = []
    placed: dict = {}  # node inserted here -> the placement of its value
    copies: dict = {}  # replicated value -> its conjugates.copy (training)

    def record(kind, src):
        mod = nodemeta.module(src) or ""
        val = src.meta.get("val")
        inserted.append({"kind": kind, "module": mod, "layer": layer_index(mod),
                         "shape": tuple(val.shape) if hasattr(val, "shape") else None})

    def convert(c, before):
        key = (c.src, c.want)
        if key in cache:
            return cache[key]
        with graph.inserting_before(before):
            cur = replaced.get(c.src, c.src)
            if c.collective is Collective.ALL_REDUCE:
                cur = (graph.call_function(conjugates.REDUCE, (cur, group_name, use_shm))
                       if training else
                       graph.call_function(collectives.all_reduce, (cur, group_name, use_shm)))
                record(Collective.ALL_REDUCE, c.src)
            elif c.collective is Collective.REDUCE_SCATTER:
                w = c.want
                cur = graph.call_function(
                    conjugates.REDUCE_SCATTER if training else collectives.reduce_scatter,
                    (cur, w.dim, w.outer, tp_rank, tp_size, group_name,
                     _int_list(w.blocks) if training else w.blocks, w.units, use_shm,
                     _int_list(w.counts) if training else w.counts))
                record(Collective.REDUCE_SCATTER, c.src)
            elif c.collective is Collective.ALL_GATHER:
                h = c.have
                cur = (graph.call_function(conjugates.GATHER,
                                           (cur, h.dim, h.outer, tp_rank, tp_size, group_name,
                                            _int_list(h.blocks), h.units, use_shm,
                                            _int_list(h.counts)))
                       if training else
                       graph.call_function(collectives.all_gather,
                                           (cur, h.dim, h.outer, tp_size, group_name,
                                            # the rank only where the split is uneven
                                            h.blocks, tp_rank if h.units is not None else None,
                                            use_shm, h.units, h.counts)))
                record(Collective.ALL_GATHER, c.src)
            w = c.want
            if isinstance(w, HeadGroup):
                if training:  # each rank's keys serve its own query heads: shares of a grad
                    cur = copy_of(cur, before)
                cur = graph.call_function(layers.kv_head_slice,
                                          (cur, w.dim, w.local_heads(tp_rank, tp_size)))
            elif c.slices:
                cur = (graph.call_function(conjugates.SCATTER,
                                           (cur, w.dim, w.outer, tp_rank, tp_size, group_name,
                                            _int_list(w.blocks), w.units, use_shm,
                                            _int_list(w.counts)))
                       if training else
                       graph.call_function(layers.local_shard,
                                           (cur, w.dim, w.outer, tp_rank, tp_size, w.blocks,
                                            w.units, w.counts)))
        nodemeta.copy_provenance(cur, c.src)
        placed[cur] = w
        cache[key] = cur
        return cur

    def copy_of(value: fx.Node, before: fx.Node) -> fx.Node:
        """``conjugates.copy`` of a replicated value, made once (before its first split
        consumer, ``before``, as nodes are visited in order)."""
        if value not in copies:
            with graph.inserting_before(before):
                copies[value] = graph.call_function(conjugates.COPY,
                                                    (value, group_name, use_shm))
            nodemeta.copy_provenance(copies[value], value)
            placed[copies[value]] = Replicate()
        return copies[value]

    def placement_of(value: fx.Node):
        if value in placed:
            return placed[value]
        if value in sol.placements:
            return sol.placements[value]
        raise RuntimeError(f"no placement for {value.format_node()} (rewrite)")

    def enter_split(node: fx.Node) -> None:
        """Route each replicated floating input of ``node`` (an op whose output is split or
        partial) through its ``copy``: its local gradient is only this rank's share."""
        for a in list(node.all_input_nodes):
            if a.op == "get_attr" or not _is_float(a) or not _replicated(placement_of(a)):
                continue
            node.replace_input_with(a, copy_of(a, node))

    for node in list(graph.nodes):
        dec = sol.decisions.get(node)
        if dec is not None:
            # (by the input as it is now: a solved node may already be replaced by its
            # layer call, a step slice of a vocab-parallel lookup's output)
            wants = {replaced.get(c.src, c.src): c.want for c in by_node.get(node, ())}
            local = local_args(node, sol.placements.get(node, dec.out),
                               lambda a: wants.get(a) or placement_of(a), tp_rank, tp_size)
            if local is not None:
                node.args, node.kwargs = local
        for c in by_node.get(node, ()):
            node.replace_input_with(replaced.get(c.src, c.src), convert(c, node))
        if training and dec is not None and dec.action is None \
                and not _replicated(sol.placements.get(node, dec.out)):
            enter_split(node)
        if dec is None or dec.action is None:
            continue
        if dec.action is Action.VOCAB_EMBEDDING:
            w, ids = node.args[0], node.args[1]
            v_global = _global_rows(node, sol)
            step = v_global // tp_size
            padding_idx = arg(node, "padding_idx")
            with graph.inserting_before(node):
                # The same call on every rank (the rank is read when the graph runs) where
                # padding_idx cannot matter: it only changes the gradient.
                new = (graph.call_function(layers.vocab_parallel_embedding_of_rank,
                                           (w, ids, step, group_name))
                       if not training or padding_idx < 0 else
                       graph.call_function(layers.vocab_parallel_embedding,
                                           (w, ids, tp_rank * step, (tp_rank + 1) * step,
                                            padding_idx)))
            if training:
                enter_split(new)
        elif dec.action in (Action.ROW_ADDMM, Action.ROW_ADDMM_PARTIAL):
            # Megatron's row-parallel linear: the local partial product, its all-reduce,
            # then the (replicated) bias added once, not once per rank. Under sequence
            # parallelism (ROW_ADDMM_PARTIAL) no all-reduce: the first rank adds the bias to
            # its partial product (0 * bias elsewhere, so every rank's bias gets its
            # gradient's share), and the solver placed the reduce-scatter after it.
            bias, a, b = node.args[:3]
            keeps_partial = dec.action is Action.ROW_ADDMM_PARTIAL
            scaling = {k: node.kwargs[k] for k in ("beta", "alpha") if k in node.kwargs}
            if keeps_partial and tp_rank != 0:
                scaling["beta"] = 0
            reduce = conjugates.REDUCE if training else collectives.all_reduce
            with graph.inserting_before(node):
                part = summed = graph.call_function(layers.partial_product, (a, b))
                if not keeps_partial:
                    summed = graph.call_function(reduce, (part, group_name, use_shm))
                new = graph.call_function(layers.add_bias, (summed, bias), scaling)
            for n in {part, summed}:
                nodemeta.copy_provenance(n, node)
            if training:
                placed[part] = Partial()
                enter_split(part)  # a replicated operand of the product (a whole weight)
                if keeps_partial:
                    enter_split(new)  # the bias, into a partial sum
            if not keeps_partial:
                record(Collective.ALL_REDUCE, node)
        elif dec.action is Action.VOCAB_CROSS_ENTROPY:
            x, target = arg(node, "input"), arg(node, "target")
            classes = _global_shape(x)[1]
            with graph.inserting_before(node):
                both = graph.call_function(
                    torch.ops.tp_backend.vocab_parallel_cross_entropy.default,
                    (x, target, tp_rank * (classes // tp_size), classes, group_name,
                     arg(node, "reduction"), arg(node, "ignore_index"),
                     arg(node, "label_smoothing")))
                new = graph.call_function(operator.getitem, (both, 0))
            nodemeta.copy_provenance(both, node)
            # max, then the sums: two all-reduces of [N] values, no [N, C] traffic
            record(Collective.ALL_REDUCE, node)
            record(Collective.ALL_REDUCE, node)
        else:  # pragma: no cover - internal invariant
            raise AssertionError(f"unknown rewrite action {dec.action}")
        new.meta.update(node.meta)
        placed[new] = sol.placements.get(node, dec.out)
        replaced[node] = new
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if training:
        _fuse_gather_copy(graph)
    _rank_random(graph, sol, placed, tp_rank)
    if not training:
        _inference_attention(graph)
    graph.lint()
    gm.recompile()
    return gm, inserted


def _fuse_gather_copy(graph: fx.Graph) -> None:
    """A ``copy`` whose input is a ``gather`` used by nothing else becomes one
    ``gather_to_split`` (the same forward; backward a reduce-scatter instead of an
    all-reduce then a chunk): the token-split input of a column-parallel matmul under
    sequence parallelism."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not conjugates.COPY:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_function"
                and src.target is conjugates.GATHER and len(src.users) == 1):
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(conjugates.GATHER_TO_SPLIT, src.args, src.kwargs)
        fused.meta.update(src.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(src)


def _rank_random(graph: fx.Graph, sol: Solution, placed: dict, tp_rank: int) -> None:
    """Random values of split activations drawn per rank (:mod:`tp_backend.rng`): the
    attention leaf's dropout mask where its heads are split, and ``rand_like`` (a dropout
    mask) of a split value, which becomes ``rank_rand_like`` seeded by one draw from the
    shared stream."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target not in (torch.ops.tp_backend.sdpa.default, aten.rand_like.default):
            continue
        if _replicated(placed.get(node, sol.placements.get(node))):
            continue
        if node.target is torch.ops.tp_backend.sdpa.default:
            if arg(node, "seed") is not None:
                node.update_kwarg("rng_rank", tp_rank)
            continue
        val = node.meta.get("val")
        x = node.args[0]
        if node.kwargs.get("dtype") not in (None, getattr(val, "dtype", None)):
            continue
        with graph.inserting_before(node):
            seed = graph.call_function(aten.randint.low, (0, 2 ** 62, []),
                                       {"dtype": torch.int64, "device": val.device})
            new = graph.call_function(torch.ops.tp_backend.rank_rand_like.default,
                                      (x, seed, tp_rank))
        nodemeta.copy_provenance(seed, node)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _inference_attention(graph: fx.Graph) -> None:
    """Attention in a graph that is not differentiated calls ``tp_backend::sdpa_inference``:
    the same kernel and arguments as ``tp_backend::sdpa``, without the Python autograd layer
    (:mod:`tp_backend.dispatch`)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.tp_backend.sdpa.default:
            node.target = leaf_ops.sdpa_inference.default


def _replicated(p) -> bool:
    """Whether a placement (or every one of a tuple of them) is ``Replicate``; ``None`` (no
    placement: a constant) counts as replicated."""
    if isinstance(p, (tuple, list)):
        return all(_replicated(q) for q in p)
    return p is None or isinstance(p, Replicate)


def _is_float(node: fx.Node) -> bool:
    """Whether ``node``'s value is a floating tensor; a node this pass inserted (no
    ``val``) has the dtype of its first argument, the value it redistributes."""
    while "val" not in node.meta and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and differentiable(val)


def _global_shape(node: fx.Node) -> tuple:
    """The global shape of the value ``node`` stands for: its own ``val``, or for a node
    this pass inserted (a conversion), the ``val`` of the value it redistributes."""
    while "val" not in node.meta and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return tuple(node.meta["val"].shape)


def _int_list(blocks) -> list | None:
    return [int(b) for b in blocks] if blocks is not None else None


def _global_rows(node: fx.Node, sol: Solution) -> int:
    """Global number of rows (vocabulary size) of an embedding's table."""
    w = node.args[0]
    src = w
    # The table may have been sliced by an inserted local_shard: read the original.
    while src.op == "call_function" and src.target in (layers.local_shard, conjugates.SCATTER,
                                                        conjugates.COPY):
        src = src.args[0]
    return int(src.meta["val"].shape[0])


def count_collectives(inserted: list[dict]) -> Counter:
    """``Counter`` of ``(kind, layer)`` over inserted collectives."""
    return Counter((c["kind"], c["layer"]) for c in inserted)
