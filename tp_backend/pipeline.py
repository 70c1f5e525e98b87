"""The pass pipeline: decompose -> solve -> plan -> rewrite, on one captured graph.

Shared by the backend (which then runs the local graph) and by planning without a
process group (:mod:`tp_backend.planning`). A pass that fails with an unexpected error is
re-raised as :class:`~tp_backend.errors.TPError` naming the pass.
"""

from __future__ import annotations

import logging
import time

import torch.fx as fx

from .decompose import decompose
from .errors import TPError
from .placement import Shard
from .plan import CollectivePlan, ParamPlan, TPPlan
from .rewrite import rewrite
from .solver import Solution, describe, solve

log = logging.getLogger("tp_backend")

__all__ = ["run_pipeline"]


def _pass(name, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TPError:
        raise
    except Exception as e:
        raise TPError(f"tp_auto: the {name} pass failed: {type(e).__name__}: {e}") from e


def run_pipeline(gm: fx.GraphModule, fakes: list, fake_mode, *, params: set, fqns: dict,
                 presharded: dict, tp_size: int, tp_rank: int, group_name: str,
                 roles: dict | None = None) -> tuple[fx.GraphModule, Solution, TPPlan]:
    """Decompose ``gm`` on ``fakes`` (global shapes), solve, build the plan and rewrite for
    rank ``tp_rank``.

    Args:
        params: indices of the placeholders that are parameters.
        fqns: index -> parameter FQN.
        presharded: index -> ``Shard`` of inputs already split by an earlier graph
            (sharded parameters, a key/value cache kept split).
        roles: index -> layout name of those presharded parameters.

    Returns:
        ``(local ATen graph module, solution, plan)``.
    """
    aten_gm = _pass("decomposition", decompose, gm, fakes, fake_mode)
    ph = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(ph):
        n.meta["tp_index"] = i
    for i, name in fqns.items():
        ph[i].meta["tp_param_fqn"] = name
        ph[i].meta["tp_module"] = name.rpartition(".")[0]
    pre = {ph[i]: s for i, s in presharded.items()}
    for i, role in (roles or {}).items():
        ph[i].meta["tp_role"] = role
    sol = _pass("solver", solve, aten_gm.graph, tp_size=tp_size, params={ph[i] for i in params},
                presharded=pre)
    plan = TPPlan(tp_size=tp_size, tp_rank=tp_rank, solve_seconds=sol.seconds, rounds=sol.rounds,
                  num_nodes=len(aten_gm.graph.nodes))
    for i in sorted(params):
        node = ph[i]
        val = node.meta["val"]
        shape = tuple(int(d) for d in val.shape)
        s: Shard | None = sol.param_storage.get(node)
        nbytes = val.element_size()
        for d in shape:
            nbytes *= d
        local = list(shape)
        if s is not None:
            local[s.dim] //= tp_size
        plan.params[fqns[i]] = ParamPlan(fqns[i], sol.param_role[node],
                                         s.dim if s is not None else None, shape, tuple(local),
                                         nbytes, nbytes // (tp_size if s is not None else 1))
    plan.replicated_ops = [(describe(n), why) for n, why in sol.notes]
    plan.demoted = [describe(n) for n in sorted(sol.demoted, key=lambda n: n.name)]
    for n, why in sol.notes:
        log.info("tp_auto: replicated %s (%s)", describe(n), why)
    t0 = time.perf_counter()
    aten_gm, inserted = _pass("rewrite", rewrite, aten_gm, sol, tp_rank=tp_rank, tp_size=tp_size,
                              group_name=group_name)
    plan.collectives = [CollectivePlan(**c) for c in inserted]
    log.info("%s\n  rewrite: %.1f ms", plan.summary(), (time.perf_counter() - t0) * 1e3)
    return aten_gm, sol, plan
