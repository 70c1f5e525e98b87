"""Whole values for what the user reads back from a sharded model, and re-sharding on load.

Owns: ``state_dict()`` and ``load_state_dict()`` of modules whose parameters (or buffers)
``tp_auto`` sharded. After sharding, an ``nn.Parameter`` keeps its identity and global
shape but its data is a one-element NaN placeholder (the rank's slice lives in the
store of :mod:`tp_backend.runtime`, :func:`tp_backend.local_shard`). Without this module
``state_dict()`` -- and so ``torch.save(model.state_dict())`` and transformers'
``save_pretrained`` -- would return those placeholders. Must not: keep a whole copy of any
tensor beyond the call that asked for it.

* ``state_dict()``: a post-hook on every module holding a sharded tensor replaces the
  placeholder by the whole tensor, all-gathered from the ranks' slices (padding rows cut).
  This is a collective, like DTensor's ``full_tensor()``: **every rank of the group calls
  ``state_dict()``** (or ``save_pretrained(..., is_main_process=rank == 0)``) in the same
  order; one rank alone would wait for the others until the process group's timeout.
* ``load_state_dict(sd)``: a pre-hook takes this rank's slice of each whole tensor in
  ``sd`` into the local shard (no communication); the placeholder itself is left as is.

Parameters whose weights ``parallelize_model`` left in the checkpoint (the store's
``pending``: read on the model's first call, each rank its slices) hold placeholders too,
and so do those the first call kept whole (their values in the store's ``whole``):
``state_dict()`` gives those values, ``load_state_dict`` copies into them. Before the first
call:

* ``state_dict()`` reads each whole from the checkpoint (no communication);
* ``sharded_state_dict()`` and ``load_state_dict(sd)`` give it its whole value in the
  store (read from the checkpoint, or ``sd``'s value), which the first call then splits or
  feeds whole. For a model too large to hold whole on one rank, call it once (a forward of
  a few tokens) before either: its weights are then split.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .runtime import STORE

__all__ = ["full_tensor", "gather_whole", "install_state_hooks", "sharded_state_dict"]

_INSTALLED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor ``tp_auto`` stored split (shape: its global shape),
    all-gathered over its tensor-parallel group; ``t`` itself (detached) if it is not split.

    Collective: every rank of the group must call it, for the same tensors, in the same
    order.
    """
    from .tp_tensor import TPTensor

    if isinstance(t, TPTensor):  # a gradient or optimizer state of a sharded parameter
        return gather_whole(t._local, t._info)
    whole = STORE.whole.get(t)
    if whole is not None:
        return whole.detach()
    st = STORE.sharded.get(t)
    if st is None:
        return t.detach()
    return gather_whole(st.local, st.info)


def gather_whole(local: torch.Tensor, info) -> torch.Tensor:
    """The whole tensor (``info.global_shape``) from every rank's ``local`` shard laid out as
    ``info`` (a :class:`~tp_backend.runtime.ShardInfo`) says: an all-gather over its group,
    padding rows cut. Collective."""
    from .collectives import all_gather

    with torch.no_grad():
        # The local shard holds, per block of the (padded) split dim, this rank's chunk:
        # all_gather is the inverse of that split.
        whole = all_gather(local.detach(), info.dim, info.outer, info.tp_size, info.group_name,
                           info.blocks, info.tp_rank, units=info.units, counts=info.counts)
        real = info.global_shape[info.dim]
        if whole.shape[info.dim] != real:  # a padded vocabulary: cut the zero rows
            whole = whole.narrow(info.dim, 0, real)
        return whole.contiguous()


def _members(module: torch.nn.Module, table, kinds=("_parameters",)):
    """``(name, tensor)`` of ``module``'s own tensors that are keys of ``table`` (one of the
    store's: ``sharded``, ``whole``, ``pending``), from its ``kinds`` dicts."""
    for kind in kinds:
        for name, t in getattr(module, kind).items():
            if t is not None and t in table:
                yield name, t


def _read_pending(t: torch.Tensor) -> torch.Tensor:
    """The whole value of parameter ``t``, whose weights are still in the checkpoint (a key
    of the store's ``pending``), read from it; ``t`` stays pending."""
    from .checkpoint import read_tensor

    return read_tensor(STORE.pending[t])


def _materialize_pending(t: torch.Tensor, read: bool = True) -> torch.Tensor:
    """Give pending parameter ``t`` its whole value, in the store's ``whole`` (the
    parameter keeps its placeholder): its weights read from the checkpoint, or with
    ``read=False`` an uninitialised tensor of its shape for the caller to fill. No longer
    pending: the first graph that uses it splits it from there, or feeds it whole. Returns
    that whole tensor."""
    whole = (_read_pending(t).to(t.device) if read
             else torch.empty(t.shape, dtype=t.dtype, device=t.device))
    STORE.whole[t] = whole
    del STORE.pending[t]
    return whole


class _Mode(threading.local):
    sharded = False


_MODE = _Mode()


def _state_dict_post_hook(module, state_dict, prefix, local_metadata) -> None:
    from .tp_tensor import TPTensor

    for name, t in _members(module, STORE.pending):
        key = prefix + name
        if key not in state_dict:
            continue
        if _MODE.sharded:  # DCP loads in place into what it gets: the model's own values
            state_dict[key] = _materialize_pending(t)
        else:
            state_dict[key] = _read_pending(t)
    for name, t in _members(module, STORE.whole):
        key = prefix + name
        if key in state_dict:
            whole = STORE.whole[t]
            state_dict[key] = whole if _MODE.sharded else whole.detach()
    for name, t in _members(module, STORE.sharded, ("_parameters", "_buffers")):
        key = prefix + name
        if key not in state_dict:
            continue
        if _MODE.sharded:
            st = STORE.sharded[t]
            state_dict[key] = TPTensor(st.local.detach(), st.info)
        else:
            state_dict[key] = full_tensor(t)


def sharded_state_dict(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` without gathering: each tensor ``tp_auto`` stored split is a
    :class:`~tp_backend.tp_tensor.TPTensor` over this rank's shard (global shape, no copy),
    the others as ``state_dict()`` gives them. What ``torch.distributed.checkpoint``
    (DCP) saves and loads in parallel, each rank writing and reading only its own chunks::

        dcp.save(tp_backend.sharded_state_dict(model), checkpoint_id=path)
        dcp.load(tp_backend.sharded_state_dict(model), checkpoint_id=path)  # in place

    A checkpoint saved this way loads at any TP size, or whole into an unsharded model's
    ``state_dict()`` on one process (DCP reads the chunks each tensor needs). No
    collective: ranks may call it alone. A parameter whose weights ``parallelize_model``
    has not read yet (the model was never called) is read whole into the store first (see
    the module's docstring), and DCP loads into that."""
    _MODE.sharded = True
    try:
        return module.state_dict(keep_vars=True)
    finally:
        _MODE.sharded = False


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    for name, t in list(_members(module, STORE.pending)):
        value = state_dict.get(prefix + name)
        if value is not None and tuple(value.shape) == tuple(t.shape):
            _materialize_pending(t, read=False)  # filled from value just below
    for name, t in _members(module, STORE.whole):
        value = state_dict.get(prefix + name)
        whole = STORE.whole[t]
        if value is not None and tuple(value.shape) == tuple(whole.shape):
            with torch.no_grad():
                whole.copy_(value.detach())
            state_dict[prefix + name] = t.detach()  # the loader copies it onto itself
    for name, t in _members(module, STORE.sharded, ("_parameters", "_buffers")):
        key = prefix + name
        value = state_dict.get(key)
        if value is None:
            continue
        st = STORE.sharded[t]
        info = st.info
        if tuple(value.shape) != info.global_shape:
            continue  # load_state_dict reports the size mismatch itself
        with torch.no_grad():
            st.local.copy_(info.local_of(value.detach().to(st.local.dtype)))
        # The default loader then copies the placeholder onto itself (a no-op).
        state_dict[key] = t.detach()


def install_state_hooks(module: torch.nn.Module) -> None:
    """Make ``module.state_dict()`` return whole tensors and ``load_state_dict`` re-shard,
    for the tensors of ``module`` that ``tp_auto`` stored split or whose weights are still
    in the checkpoint (idempotent)."""
    if module in _INSTALLED:
        return
    module.register_state_dict_post_hook(_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_load_pre_hook)
    _INSTALLED.add(module)
