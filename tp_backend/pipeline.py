"""The pass pipeline: decompose -> solve -> plan -> rewrite, on one captured graph.

Shared by the backend (which then runs the local graph) and by planning without a
process group (:mod:`tp_backend.planning`). A pass that fails with an unexpected error is
re-raised as :class:`~tp_backend.errors.TPPassError` naming the pass.

Owns: :func:`run_pipeline`: the order of the passes (decomposition, causal masks,
vocabulary padding, solver, rewrite), tagging the placeholders (input index, FQN, role),
taking written-back inputs as state, the divisibility warning or error, building the
:class:`~tp_backend.plan.TPPlan`, and wrapping failures as ``TPPassError``. Must not: do a
pass's own work (:mod:`tp_backend.decompose`, :mod:`tp_backend.causal`,
:mod:`tp_backend.padding`, :mod:`tp_backend.solver`, :mod:`tp_backend.rewrite`), compile or
run the local graph, or touch process groups or stored weights (:mod:`tp_backend.backend`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.fx as fx

from . import nodemeta
from .causal import make_masks_causal
from .decompose import decompose
from .padding import pad_vocabularies
from .errors import TPDivisibilityError, TPError, TPPassError
from .placement import Shard
from .plan import CollectivePlan, ParamPlan, TPPlan
from .rewrite import rewrite
from .solver import Solution, solve

log = logging.getLogger("tp_backend")

__all__ = ["run_pipeline"]


def _pass(name, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TPError:
        raise
    except Exception as e:
        raise TPPassError(f"tp_auto: the {name} pass failed: {type(e).__name__}: {e}",
                          name, f"{type(e).__name__}: {e}") from e


def run_pipeline(gm: fx.GraphModule, fakes: list, fake_mode, *, params: set, fqns: dict,
                 presharded: dict, tp_size: int, tp_rank: int, group_name: str,
                 use_shm: bool = False, training: bool = False,
                 roles: dict | None = None, stateful_names: dict | None = None,
                 aliases: dict | None = None,
                 module_path: Callable[[fx.Node], str] = lambda n: "",
                 veto: frozenset = frozenset(), strict_divisibility: bool = False,
                 outputs: str = "gather", sequence_parallel: bool = False,
                 lm_head: str = "split",
                 balance: str = "off") -> tuple[fx.GraphModule, Solution, TPPlan]:
    """Decompose ``gm`` on ``fakes`` (global shapes), solve, build the plan and rewrite for
    rank ``tp_rank``.

    Args:
        params: indices of the placeholders that are parameters.
        fqns: index -> parameter (or buffer) FQN, as the model's ``named_parameters()``
            names it (:mod:`tp_backend.naming`).
        presharded: index -> ``Shard`` of inputs already split by an earlier graph
            (sharded parameters, a key/value cache kept split).
        roles: index -> layout name of those presharded parameters.
        stateful_names: index -> name of inputs that are not parameters (used if the graph
            writes into them, e.g. a static KV cache).
        aliases: index -> other names of a tied parameter.
        module_path: names the module a Dynamo node ran in (for the plan's per-layer
            collectives and log lines).
        use_shm: all-reduces call the same-host shared-memory kernel (:mod:`tp_backend.shm`).
        training: the local graph will be differentiated: its redistributions are the
            differentiable ones of :mod:`tp_backend.conjugates`.
        veto: names of seed nodes to keep replicated (see :func:`~tp_backend.solver.solve`).
        outputs: whether outputs split evenly on one dim are returned split, not gathered:
            ``"gather"``, ``"split"`` or ``"split_with_loss"`` (see
            :func:`~tp_backend.solver.solve`).
        sequence_parallel: reduce-scatter partial sums over their tokens where the
            consumers are sequence-wise (see :func:`~tp_backend.solver.solve`).
        lm_head: ``"split"`` (vocab-parallel) or ``"replicate"`` (whole on every rank): the
            LM head's placement (see :func:`~tp_backend.solver.solve`).
        balance: ``"work"`` or ``"off"``: even out the ranks' work where a split is uneven
            (see :func:`~tp_backend.solver.solve`).
        strict_divisibility: raise where a split needs a count (heads, groups of a fused
            projection) that ``tp_size`` does not divide; else keep that projection whole
            with a warning (the backend's ``fallback="replicate"``).

    Returns:
        ``(local ATen graph module, solution, plan)``.

    Raises:
        TPDivisibilityError: with ``strict_divisibility``, naming the tensor, the count and
            ``tp_size``.
        TPPassError: a pass failed with an unexpected error.
    """
    stateful_names = stateful_names or {}
    fqns = dict(fqns)
    t_start = time.perf_counter()
    aten_gm = _pass("decomposition", decompose, gm, fakes, fake_mode, module_path)
    t_decomposed = time.perf_counter()
    causal = _pass("causal masks", make_masks_causal, aten_gm)
    ph = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(ph):
        nodemeta.set_input_index(n, i)
    for i, name in fqns.items():
        nodemeta.set_param_fqn(ph[i], name, with_module=True)
    # Inputs the graph writes back into (a static KV cache: functionalisation ends the graph
    # with copy_(input, new value)) are state, like parameters: they may be stored split.
    params = set(params)
    for n in aten_gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.copy_.default \
                and n.args[0].op == "placeholder":
            i = nodemeta.input_index(n.args[0])
            if i not in params:
                params.add(i)
                fqns[i] = stateful_names.get(i, n.args[0].name)
                nodemeta.set_param_fqn(n.args[0], fqns[i])
    pads = _pass("vocabulary padding", pad_vocabularies, aten_gm, [ph[i] for i in sorted(params)],
                 tp_size, fake_mode)
    stand_in = {n: pads.get(n, n) for n in ph}  # a padded parameter is solved as its pad
    pre = {stand_in[ph[i]]: s for i, s in presharded.items()}
    for i, role in (roles or {}).items():
        nodemeta.set_role(stand_in[ph[i]], role)
    sol = _pass("solver", solve, aten_gm.graph, tp_size=tp_size,
                params={stand_in[ph[i]] for i in params}, presharded=pre, veto=frozenset(veto),
                outputs=outputs, sequence_parallel=sequence_parallel, lm_head=lm_head,
                balance=balance)
    for why in sol.indivisible:
        if strict_divisibility:
            raise TPDivisibilityError(f"tp_auto: {why}.")
        log.warning("tp_auto: %s. Kept whole on every rank instead (no memory saved for it); "
                    "options={'fallback': 'raise'} makes this an error.", why)
    for w, pad in pads.items():
        sol.param_storage[w] = sol.param_storage.pop(pad)
        sol.param_role[w] = sol.param_role.pop(pad)
        sol.param_padding[w] = int(pad.meta["val"].shape[0])
        if pad in sol.lm_head:
            sol.lm_head = sol.lm_head - {pad} | {w}
    plan = TPPlan(tp_size=tp_size, tp_rank=tp_rank, solve_seconds=sol.seconds, rounds=sol.rounds,
                  num_nodes=len(aten_gm.graph.nodes), all_reduce_impl="shm" if use_shm else "group")
    plan.timings["decompose_s"] = t_decomposed - t_start
    plan.timings["solve_s"] = sol.seconds
    plan.causal_masks = causal
    sol.stored_inputs = {i: fqns[i] for i in params}
    for i in sorted(params):
        node = ph[i]
        val = node.meta["val"]
        shape = tuple(int(d) for d in val.shape)
        s: Shard | None = sol.param_storage.get(node)
        nbytes = val.element_size()
        for d in shape:
            nbytes *= d
        local = list(shape)
        rank_sizes = ()
        if s is not None:
            size = sol.param_padding.get(node, local[s.dim])
            local[s.dim] = s.local_size(size, tp_rank, tp_size)
            nbytes_local = nbytes // shape[s.dim] * local[s.dim]
            if s.units is not None:
                rank_sizes = tuple(s.local_size(size, r, tp_size) for r in range(tp_size))
        else:
            nbytes_local = nbytes
        plan.params[fqns[i]] = ParamPlan(fqns[i], sol.param_role[node],
                                         s.dim if s is not None else None, shape, tuple(local),
                                         nbytes, nbytes_local, (aliases or {}).get(i, ()),
                                         rank_sizes)
    plan.replicated_ops = [(nodemeta.describe(n), why) for n, why in sol.notes]
    plan.demoted = [nodemeta.describe(n) for n in sorted(sol.demoted - sol.lm_head_seeds,
                                                         key=lambda n: n.name)]
    plan.sequence_values = len(sol.sequence_values)
    plan.lm_head = tuple(sorted(fqns[nodemeta.input_index(n)] for n in sol.lm_head))
    plan.lm_head_choice = lm_head
    plan.balance = sol.balance
    for n, why in sol.notes:
        log.info("tp_auto: replicated %s (%s)", nodemeta.describe(n), why)
    t0 = time.perf_counter()
    aten_gm, inserted = _pass("rewrite", rewrite, aten_gm, sol, tp_rank=tp_rank, tp_size=tp_size,
                              group_name=group_name, use_shm=use_shm, training=training)
    plan.collectives = [CollectivePlan(**c) for c in inserted]
    plan.timings["rewrite_s"] = time.perf_counter() - t0
    for w, pad in pads.items():
        if sol.param_storage.get(w) is not None:
            # The runner feeds the parameter's padded local shard: the pad is done.
            pad.replace_all_uses_with(w)
            aten_gm.graph.erase_node(pad)
    if pads:
        aten_gm.graph.lint()
        aten_gm.recompile()
    log.info("%s\n  rewrite: %.1f ms", plan.summary(), (time.perf_counter() - t0) * 1e3)
    return aten_gm, sol, plan
