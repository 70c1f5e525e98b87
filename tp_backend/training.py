"""What a training step touches outside the compiled graphs: the local shards that hold the
trainable values, their gradients, gradient clipping across the ranks, and the guard that
stops an optimizer from stepping on placeholders.

The graphs themselves are differentiated through the conjugate collectives of
:mod:`tp_backend.conjugates`. Backward leaves this rank's slice of each sharded
parameter's gradient on its local shard (a leaf tensor) and the whole gradient, the same on
every rank, on each replicated parameter.

Owns: :func:`local_parameters`, :func:`local_grad`, :func:`clip_grad_norm_` and the
optimizer guard (:func:`refuse_optimizer_step_on_placeholders`). Must not: hold split
values (:mod:`tp_backend.runtime` does) or decide how a graph is differentiated
(:mod:`tp_backend.rewrite`, :mod:`tp_backend.conjugates`).
"""

from __future__ import annotations

import math

import torch

from .errors import TPTrainingError
from .runtime import STORE, local_shard

__all__ = ["local_parameters", "local_grad", "clip_grad_norm_",
           "refuse_optimizer_step_on_placeholders"]


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's slice of the gradient of a parameter sharded by ``tp_auto`` (shape: the
    local shard's), accumulated by backward through a graph compiled for training; the
    parameter's own ``.grad`` if it is not sharded. ``None`` before any backward."""
    st = STORE.sharded.get(param)
    return st.local.grad if st is not None else param.grad


def local_parameters(module: torch.nn.Module):
    """The tensors that hold ``module``'s trainable values on this rank: the local shard
    (a leaf whose ``.grad`` is :func:`local_grad`) of each sharded parameter, the parameter
    itself for the others (tied parameters once). Call it after the first compiled call
    (which shards the parameters). For an optimizer whose update is element-wise (SGD,
    Adam, AdamW), a step over these equals this rank's slice of the single-process step."""
    for p in module.parameters():
        yield local_shard(p)


def clip_grad_norm_(module: torch.nn.Module, max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a module ``tp_auto`` sharded: the norm of all
    its gradients as one process computes it, and every gradient scaled by ``max_norm /
    (norm + 1e-6)`` where that is below 1 (PyTorch's rule). The ``p``-th powers of the local
    shards' gradients are summed over the tensor-parallel group (the shards are disjoint;
    padding rows have zero gradient); replicated gradients, the same on every rank, count
    once. A collective: every rank of the group calls it.

    Returns the total norm (a 0-dim tensor, the same on every rank). Raises ``ValueError``
    for a non-finite ``norm_type`` (an infinity norm needs a max over the ranks)."""
    from .collectives import all_reduce

    if not math.isfinite(norm_type) or norm_type <= 0:
        raise ValueError(f"tp_backend.clip_grad_norm_ supports a finite positive norm_type, "
                         f"got {norm_type}")
    whole, split = [], {}
    for p in module.parameters():
        st = STORE.sharded.get(p)
        g = st.local.grad if st is not None else p.grad
        if g is None:
            continue
        (split.setdefault(st.info.group_name, []) if st is not None else whole).append(g)
    grads = whole + [g for gs in split.values() for g in gs]
    if not grads:
        return torch.tensor(0.0)

    def powered(gs):
        return sum(torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32)
                   ** norm_type for g in gs)

    total = powered(whole) if whole else torch.zeros((), dtype=torch.float32)
    for group_name, gs in sorted(split.items()):
        total = total + all_reduce(powered(gs).reshape(1), group_name)[0]
    norm = total ** (1.0 / norm_type)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


_OPTIMIZER_HOOK: list = []


def refuse_optimizer_step_on_placeholders() -> None:
    """Make every optimizer refuse to step (a :class:`TPTrainingError`) while it holds a
    parameter ``tp_auto`` sharded: that parameter's data is a placeholder and its gradient
    lives on the local shard, so a step would silently skip it. Installed once, when the
    first parameter that requires grad is sharded."""
    if _OPTIMIZER_HOOK:
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def check(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = STORE.sharded.get(p)
                if st is not None:
                    raise TPTrainingError(
                        f"tp_auto: {type(optimizer).__name__} holds parameter "
                        f"{st.info.fqn!r}, which tp_auto sharded across the tensor-parallel "
                        "ranks: its data is a placeholder and its gradient is on this rank's "
                        "shard. Build the optimizer over tp_backend.local_parameters(model) "
                        "after the first compiled call, e.g. torch.optim.AdamW("
                        "tp_backend.local_parameters(model), lr=...)")
    _OPTIMIZER_HOOK.append(register_optimizer_step_pre_hook(check))
