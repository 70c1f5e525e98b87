"""Registering tp_backend's non-differentiable ops with PyTorch's dispatcher, at the lowest
per-call cost ``torch.library`` offers.

``torch.library.custom_op`` wraps a Python kernel in several Python layers that run on every
call, differentiable or not: an autograd kernel (``torch._library.autograd``) that
redispatches below autograd, then the op's own wrappers around the kernel. Measured here
(torch 2.13, one thread, a kernel that clones an 8-element tensor, under ``no_grad``): 9.2 µs
per call through ``custom_op``, 2.9 µs through ``torch.library.Library.define`` and ``impl``
with a ``CompositeExplicitAutograd`` kernel, 1.1 µs for the clone alone. A compiled local
graph calls these ops on every forward (per layer: two shared-memory all-reduces and the
attention, and on CPU up to seven oneDNN linears), so a 30-layer decode step pays the
difference about 90 times.

The ops defined here have no autograd formula, and need none: they run in inference graphs
(training graphs call the differentiable conjugates of :mod:`tp_backend.conjugates`, and
attention's ``tp_backend::sdpa``, whose twin ``tp_backend::sdpa_inference`` the rewrite
puts only in graphs that are not differentiated), take integer inputs
(:func:`tp_backend.layers.vocab_parallel_embedding_of_rank`'s ids), or are put in by the
decomposition table Inductor applies below autograd (:mod:`tp_backend.cpu_matmul`). Ops
that need a backward (``tp_backend::sdpa``, ``tp_backend::cross_entropy``, the conjugates)
stay ``custom_op`` with ``register_autograd``.

Owns: :func:`plain_op`. Must not: hold any op's kernel (each lives in the module that owns
what it computes).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["plain_op"]

# One fragment per namespace, kept alive for the life of the process (an op's registration
# ends when its Library object is freed).
_LIBRARIES: dict = {}


def plain_op(qualname: str, kernel: Callable, fake: Callable) -> torch._ops.OpOverloadPacket:
    """Define op ``qualname`` (``"namespace::name"``) with ``kernel`` as its implementation
    on every device (``CompositeExplicitAutograd``) and ``fake`` as its fake (meta)
    implementation; returns the op (``torch.ops.namespace.name``), callable like ``kernel``.

    The schema comes from ``kernel``'s annotations (``torch.library.infer_schema``, as
    ``custom_op`` infers it); the op mutates none of its inputs and must not return an
    alias of one. Without an autograd formula, a call on inputs that require grad gives
    outputs whose backward PyTorch's autograd fallback handles (it warns): only for ops
    whose results need no gradient (see the module docstring).

    Raises:
        RuntimeError: ``qualname`` is already defined (by torch.library).
    """
    namespace, name = qualname.split("::")
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    lib.define(name + torch.library.infer_schema(kernel, mutates_args=()))
    lib.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)
    return getattr(getattr(torch.ops, namespace), name)
