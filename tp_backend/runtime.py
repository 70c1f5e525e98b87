"""Runtime state of split values: what Python holds in place of the tensors ``tp_auto``
split, and where their local parts live.

Owns :class:`ShardInfo` (how a parameter was split), the process's :class:`ShardStore`
(:data:`STORE`: parameters and state stored split -> their local part, weights still to be
read from a checkpoint, the modules that refuse eager calls, a counter of splits), the
placeholders that stand in for split data (:func:`placeholder`,
:func:`state_placeholder`, :func:`placeholders`), the marker carried by values a graph
returned split (:data:`SPLIT_ATTR`), and the public accessors (:func:`sharding_info`,
:func:`local_shard`, :func:`local_parameter_bytes`, :func:`local_value`).

It must not solve, rewrite or compile (:mod:`tp_backend.backend` and the pipeline do), nor
read checkpoint files (:mod:`tp_backend.checkpoint`). The backend reaches the store as
``tp_auto.store``.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .errors import TPShardedModuleError

if TYPE_CHECKING:
    from .rules import Role

log = logging.getLogger("tp_backend")

__all__ = ["ShardInfo", "ShardStore", "STORE", "SPLIT_ATTR", "sharding_info",
           "differentiable", "local_shard", "local_parameter_bytes", "local_value", "split_value",
           "placeholder", "state_placeholder", "placeholders", "no_eager_fallback",
           "refuse_eager_call"]


@dataclass(frozen=True)
class ShardInfo:
    """How a parameter was sharded: split on ``dim``; ``global_shape`` before the split."""

    fqn: str
    dim: int
    layout: Role
    global_shape: tuple
    tp_rank: int
    tp_size: int
    group_name: str
    outer: int = 1
    blocks: tuple | None = None  # see tp_backend.placement.Shard
    padded: int | None = None  # dim size after zero padding (a vocabulary, see padding.py)
    units: int | None = None  # an uneven split (see tp_backend.placement.Shard)
    counts: tuple | None = None  # its units per rank, where not the even deal

    def ranges(self) -> list:
        """``(start, length)`` ranges of dim ``dim`` this rank holds, in local order
        (of the padded dim: rows at or past the real size are zeros)."""
        from .layers import shard_ranges

        size = self.padded or self.global_shape[self.dim]
        return shard_ranges(size, self.outer, self.tp_rank, self.tp_size, self.blocks,
                            self.units, self.counts)

    def pieces(self) -> list:
        """``[(start, local start, length, real)]`` per range of :meth:`ranges`: where it
        begins in the (padded) dim and in the local shard, its length, and how many of its
        rows are real (the rest, at its end, are padding: rows at or past the real size)."""
        real, out, local_start = self.global_shape[self.dim], [], 0
        for start, length in self.ranges():
            out.append((start, local_start, length, max(0, min(start + length, real) - start)))
            local_start += length
        return out

    def take(self, read, dtype: torch.dtype, device=None) -> torch.Tensor:
        """This rank's shard, from ``read(start, length)`` of the real rows (zero rows of
        ``dtype`` on ``device`` stand for padding)."""
        parts = []
        for start, _, length, n_real in self.pieces():
            if n_real:
                parts.append(read(start, n_real))
            if n_real < length:
                shape = list(self.global_shape)
                shape[self.dim] = length - n_real
                parts.append(torch.zeros(shape, dtype=dtype, device=device))
        return torch.cat(parts, dim=self.dim) if len(parts) > 1 else parts[0]

    def local_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``whole`` (the tensor of ``global_shape``)."""
        return self.take(lambda start, n: whole.narrow(self.dim, start, n), whole.dtype,
                         whole.device)


@dataclass
class _Sharded:
    info: ShardInfo
    local: torch.Tensor  # this rank's slice, e.g. [out/N, in] for a column-parallel weight


# Values a graph returned split over heads (key/value caches): Python sees a one-element
# placeholder of the global shape (a DynamicCache holds it, and its shape is right) that
# carries (Shard, local tensor) in this attribute; the next graph that takes it as input
# gets the local tensor. An attribute of the placeholder itself (not a weak dictionary): it
# lives and dies with the placeholder, and reading it costs a fraction of a microsecond on
# each of the 2 x layers cache entries of every decode step.
SPLIT_ATTR = "_tp_split_value"


class _CountedWeakKeyDictionary(WeakTensorKeyDictionary):
    """A :class:`~torch.utils.weak.WeakTensorKeyDictionary` that counts the changes made
    to it (``changes``; an entry dropped because its key died is not counted): a reader
    that cached what it found can tell whether it still holds."""

    def __init__(self):
        super().__init__()
        self.changes = 0

    def __setitem__(self, key, value) -> None:
        self.changes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.changes += 1
        super().__delitem__(key)

    def pop(self, key, *default):
        self.changes += 1
        return super().pop(key, *default)

    def popitem(self):
        self.changes += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        self.changes += 1
        return super().setdefault(key, default)

    def update(self, dict=None, **kwargs) -> None:  # noqa: A002 - the base's signature
        self.changes += 1
        super().update(dict, **kwargs)


class ShardStore:
    """Everything this process holds split, in one place.

    Attributes:
        sharded: parameters (and graph state) stored split -> ``_Sharded(info, local)``.
            Weak: dropping the model frees them. The tensor keeps its identity and global
            shape, but its data becomes a one-element NaN placeholder of that shape: the
            full tensor is freed, Dynamo keeps seeing global shapes (so a re-trace yields
            the same graph and hits the backend's cache), and an accidental eager use
            yields NaN rather than plausible numbers.
        promoted: parameters stored split -> the
            :class:`~tp_backend.tp_tensor.TPTensor` parameter that replaced them in their
            modules when a training graph first used them (:meth:`promote`).
        pending: parameters built by ``parallelize_model`` whose values are still in the
            checkpoint -> their ``ParameterMeta``; the runner reads them (only this rank's
            slice) on first use.
        whole: parameters of ``pending`` that the first graph keeps whole -> their values,
            read on that call. The parameter keeps its placeholder, so its layout (which
            Dynamo guards) never changes and no graph compiles twice; the runner feeds
            graphs these values (a graph differentiated through it makes the parameter
            hold them: its gradient must reach the parameter). Counts its changes
            (``whole.changes``), so a runner may reuse the values it found on its last
            call while nothing has changed.
        hooked: modules given the pre-hook that refuses an eager call on placeholders.
        count: how many tensors this process has split so far (only grows): runners
            rescan their parameters when it changes.
    """

    def __init__(self):
        self.sharded = WeakTensorKeyDictionary()
        self.pending = WeakTensorKeyDictionary()
        self.hooked: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
        self.promoted = WeakTensorKeyDictionary()
        # Parameters kept whole whose values parallelize_model read on the first call: the
        # parameter keeps its placeholder (its layout, which Dynamo guards, never changes)
        # and the runner feeds the graph this whole tensor.
        self.whole = _CountedWeakKeyDictionary()
        self.count = 0

    def record(self, t: torch.Tensor, info: ShardInfo, local: torch.Tensor, found=None):
        """Store ``t`` split: ``local`` is this rank's part; ``t.data`` becomes a
        placeholder (stride 1 for state a graph writes into, see
        :func:`state_placeholder`). ``found`` (a :class:`~tp_backend.naming.NameIndex`
        entry: the tensor's name, the modules holding it, its owner) renames ``info`` to
        the tensor's own name, installs the ``state_dict`` hooks on its holders and the
        eager-call refusal on its owner. Returns the ``_Sharded`` record."""
        from . import state

        if found is not None and found.name != info.fqn:
            info = dataclasses.replace(info, fqn=found.name)
        st = self.sharded[t] = _Sharded(info, local)
        self.count += 1
        with torch.no_grad():
            make = placeholder if isinstance(t, torch.nn.Parameter) else state_placeholder
            t.data = make(t.shape, t.dtype, t.device)
        # state_dict()/save_pretrained read whole tensors back, load_state_dict re-shards.
        holders = found.holders if found is not None else ()
        for holder in holders:
            state.install_state_hooks(holder)
        if found is not None and found.owner is not None:
            self.refuse_eager_calls(found.owner)
        no_eager_fallback()
        return st

    def refuse_eager_calls(self, module: torch.nn.Module) -> None:
        """Give ``module`` (which holds placeholders: parameters stored split, or weights
        still in the checkpoint) the pre-hook that raises on an eager call (idempotent)."""
        if module not in self.hooked:
            module.register_forward_pre_hook(refuse_eager_call)
            self.hooked.add(module)

    def promote(self, t: torch.Tensor, holders) -> torch.Tensor:
        """The :class:`~tp_backend.tp_tensor.TPTensor` parameter standing for ``t`` (a
        parameter stored split), made on the first call of a training graph and put in
        ``t``'s place in every module of ``holders``: stock optimizers, ``clip_grad_norm_``
        and ``p.grad`` then see real values (see :mod:`tp_backend.tp_tensor`). ``t``
        itself if it does not require grad, is not floating point, or no module holds it.
        Both the old parameter and the new one map to the same local shard."""
        from .tp_tensor import TPTensor, promote

        if isinstance(t, TPTensor):
            return t
        new = self.promoted.get(t)
        if new is not None:
            return new
        st = self.sharded[t]
        if not (isinstance(t, torch.nn.Parameter) and t.requires_grad and holders
                and differentiable(st.local)):
            return t
        new = promote(t, st.info, st.local, holders)
        self.sharded[new] = _Sharded(st.info, new._local)
        self.promoted[t] = new
        self.count += 1
        from .training import move_optimizers_to_promoted

        move_optimizers_to_promoted()
        return new


STORE = ShardStore()


def differentiable(t: torch.Tensor) -> bool:
    """Whether autograd can differentiate through ``t``'s dtype (floating or complex)."""
    return t.is_floating_point() or t.is_complex()


def sharding_info(param: torch.Tensor) -> ShardInfo | None:
    """The :class:`ShardInfo` of a parameter sharded by ``tp_auto``, else ``None``."""
    st = STORE.sharded.get(param)
    return st.info if st is not None else None


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a parameter sharded by ``tp_auto`` (the parameter itself if it
    is not sharded)."""
    st = STORE.sharded.get(param)
    if st is not None:
        return st.local
    whole = STORE.whole.get(param)
    return whole if whole is not None else param


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameter data this rank holds for ``module``: the local shard of every
    sharded parameter plus every replicated parameter (tied parameters counted once).
    Weights ``parallelize_model`` has not read yet (before the model's first call) count
    nothing."""
    total = 0
    for p in module.parameters():  # deduplicates tied parameters
        if p not in STORE.pending:
            total += local_shard(p).nbytes
    return total


def local_value(t: torch.Tensor) -> torch.Tensor | None:
    """The local part of a value a graph returned split over heads (a key/value cache
    entry), or ``None`` for an ordinary tensor."""
    held = split_value(t)
    return held[1] if held is not None else None


def split_value(t: torch.Tensor):
    """``(Shard, local tensor)`` if ``t`` is the placeholder of a value returned split."""
    return t.__dict__.get(SPLIT_ATTR)


def no_eager_fallback() -> None:
    """Make Dynamo raise where it would run a frame eagerly after ``recompile_limit``
    recompilations (``torch._dynamo.config.fail_on_recompile_limit_hit``), once this
    process holds sharded parameters: that eager run would compute on their one-element
    NaN placeholders and return NaN (JetMoE did, on its second sequence length: its router's
    ``.tolist()`` makes Dynamo recompile for every routing). Process-wide, as the setting
    is; logged once."""
    cfg = torch._dynamo.config
    if getattr(cfg, "fail_on_recompile_limit_hit", True):
        return
    cfg.fail_on_recompile_limit_hit = True
    log.info("tp_auto: set torch._dynamo.config.fail_on_recompile_limit_hit = True: a frame "
             "that reaches torch._dynamo.config.recompile_limit (%s) raises instead of running "
             "eagerly on the placeholders of sharded parameters; raise the limit if a model "
             "needs more recompilations, or set torch._dynamo.config.capture_scalar_outputs "
             "= True for one that recompiles because its Python code reads tensor values "
             "(.tolist(), .item())", cfg.recompile_limit)


def refuse_eager_call(module, args):
    if not torch.compiler.is_compiling():
        raise TPShardedModuleError(
            f"this {type(module).__name__} holds parameters that tp_auto sharded across the "
            "tensor-parallel ranks (or whose weights parallelize_model reads on the compiled "
            "model's first call); it only computes correct results through the compiled "
            "model. Call the object returned by torch.compile (for parallelize_model, the "
            "model itself: model(...) or model.generate(...)) instead of the original module "
            "or its forward.")


def placeholder(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A one-element tensor expanded to ``shape``: what Python holds in place of data kept
    elsewhere (a parameter's local shard, a split KV cache, a weight not yet read). NaN (0
    for integers), so an accidental eager use gives NaN rather than plausible numbers."""
    return torch.full((), _fill(dtype), dtype=dtype, device=device).expand(shape)


def state_placeholder(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A :func:`placeholder` for state a graph writes into (a recurrent or convolution
    state that ``copy_`` updates in place): every stride 1, so ``sum(size - 1) + 1``
    elements back it. An expanded (stride-0) tensor would make Dynamo refuse the write
    ("more than one element of the written-to tensor refers to a single memory location");
    stride-1 dims overlap too, but not in a way PyTorch's overlap check proves."""
    shape = tuple(shape)
    if not shape:
        return torch.full((), _fill(dtype), dtype=dtype, device=device)
    n = sum(max(s - 1, 0) for s in shape) + 1
    return torch.full((n,), _fill(dtype), dtype=dtype, device=device).as_strided(
        shape, (1,) * len(shape))


def _fill(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point or dtype.is_complex else 0


def placeholders(n: int, shape, dtype: torch.dtype, device=None) -> tuple:
    """``n`` distinct :func:`placeholder` tensors of one shape, made in one call (a decode
    step returns two per layer): one :func:`placeholder` of ``[n, *shape]`` unbound, so
    all are views of one shared element at storage offset 0. Placeholders at different
    offsets would make Dynamo compile the next call with one SymInt input (and guard) per
    placeholder for its offset."""
    return placeholder((n, *shape), dtype, device).unbind(0)
