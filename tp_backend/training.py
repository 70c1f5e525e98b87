"""What a training step touches outside the compiled graphs: gradients of sharded
parameters, and optimizers built before the parameters were sharded.

The graphs themselves are differentiated through the conjugate collectives of
:mod:`tp_backend.conjugates`. On the first call of a graph compiled for training, each
sharded parameter that requires grad becomes a :class:`~tp_backend.tp_tensor.TPTensor`
parameter in its modules; backward leaves this rank's slice of its gradient in its own
``.grad`` (a TPTensor too), and the whole gradient, the same on every rank, on each
replicated parameter. Stock optimizers and ``torch.nn.utils.clip_grad_norm_`` over
``model.parameters()`` then work unchanged (see :mod:`tp_backend.tp_tensor`).

Owns: :func:`local_grad` and the optimizer step pre-hook that moves an optimizer built
over the parameters before they were promoted (:func:`move_optimizers_to_promoted`).
Must not: hold split values (:mod:`tp_backend.runtime` does) or decide how a graph is
differentiated (:mod:`tp_backend.rewrite`, :mod:`tp_backend.conjugates`).
"""

from __future__ import annotations

import torch

from .runtime import STORE
from .tp_tensor import TPTensor

__all__ = ["local_grad", "move_optimizers_to_promoted"]


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's slice of the gradient of a parameter sharded by ``tp_auto`` (shape: the
    local shard's), accumulated by backward through a graph compiled for training; the
    parameter's own ``.grad`` if it is not sharded. ``None`` before any backward."""
    param = STORE.promoted.get(param, param) if not isinstance(param, TPTensor) else param
    g = param.grad
    return g._local if isinstance(g, TPTensor) else g


_OPTIMIZER_HOOK: list = []


def move_optimizers_to_promoted() -> None:
    """Install (once) a step pre-hook on every optimizer: parameters it holds that
    ``tp_auto`` has since replaced by a :class:`~tp_backend.tp_tensor.TPTensor` parameter
    (an optimizer built before the first compiled training call) are replaced by it in
    ``param_groups``, and any state already kept for them (whole tensors) becomes this
    rank's slice. So an optimizer works whether built before or after ``torch.compile``."""
    if _OPTIMIZER_HOOK:
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def move(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                new = STORE.promoted.get(p) if not isinstance(p, TPTensor) else None
                if new is None:
                    continue
                params[i] = new
                old_state = optimizer.state.pop(p, None)
                if old_state:
                    optimizer.state[new] = {
                        k: _slice_like(v, new) for k, v in old_state.items()}
    _OPTIMIZER_HOOK.append(register_optimizer_step_pre_hook(move))


def _slice_like(v, p: TPTensor):
    if isinstance(v, torch.Tensor) and not isinstance(v, TPTensor) and v.shape == p.shape:
        return TPTensor(p._info.local_of(v.detach()).clone(), p._info)
    return v
