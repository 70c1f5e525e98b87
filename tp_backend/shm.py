"""Same-host shared-memory all-reduce for CPU ranks, through DeepSpeed's kernel.

Owns: deciding, on every rank together, whether a ``tp_group`` can use the kernel; building
and initialising it; the custom ops ``tp_backend::shm_all_reduce`` and
``tp_backend::shm_all_gather`` (an all-reduce of a zero buffer) that the rewritten graphs
call; and the watchdog that ends a rank whose peer died during one of these all-reduces.
Must not: decide placements, or serve a group it was not set up for.

The kernel is DeepSpeed's CPU ``inference_all_reduce`` (``deepspeed.ops.op_builder``'s
``ShareMemCommBuilder``, the one behind ``deepspeed.comm.inference_all_reduce`` and DeepSpeed
AutoTP on CPU): each rank copies its tensor into a shared-memory buffer and every rank sums
the buffers in rank order, so all ranks get the same bits. It is a well-kept library, used
as is (optional dependency: the ``shm`` extra, ``pip install -e '.[shm]'``). Measured here
through this op (``benchmarks/collectives.py``, TP=2): 17 us for 6 KiB and 0.41 ms for
2 MiB, where gloo takes 1.4 ms and 3.0 ms.

Its limits decide when it is used (``all_reduce="auto"``, the default):

- the kernel spans the whole world (it is initialised once per process with the world's
  rank and size), so ``tp_group`` must contain every rank;
- every rank on one host (checked by host name), at least one CPU per rank (the kernel
  waits by spinning; the union of the ranks' CPU affinities is counted), CPU tensors of
  float32 (bfloat16 and float16 need AVX-512), a gloo group, Linux;
- ``deepspeed`` installed and its kernel built (once per machine, about 30 s, cached by
  ``torch.utils.cpp_extension`` in ``~/.cache/torch_extensions``).

Anywhere else the group's own all-reduce (gloo, NCCL) runs. The kernel waits for its peers
by spinning on shared flags, with no timeout: a peer that exits in the middle would leave
this rank waiting forever, so a watchdog thread checks, while an all-reduce has run for more
than a second, whether every peer process still lives, and ends this rank with an error
message (exit code 1) if one does not and the same all-reduce is still in flight 5 s later
(a peer that finished the all-reduce first may exit before this rank leaves it), or once
it has waited torch.distributed's default timeout (30 minutes; a custom group timeout is not
visible through a public API). Under torchrun the agent ends the other ranks first.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .consistency import any_rank
from .dispatch import plain_op
from .errors import TPOptionsError

__all__ = ["setup", "supports", "shm_all_reduce", "shm_all_gather", "ALL_REDUCE_CHOICES"]

log = logging.getLogger("tp_backend")

ALL_REDUCE_CHOICES = ("auto", "shm", "group")

# Per process: whether the kernel is built and initialised, its ISA level (1: float32, 2:
# also bfloat16/float16), the peers' process ids, and the start time of the all-reduce in
# flight (read by the watchdog).
_KERNEL: dict = {"ready": False, "level": 0, "peers": (), "inflight": None}
_SERVED: dict = {}  # group_name -> bool (the agreed answer of setup)
_WATCHDOG_AFTER_S = 1.0
# How long the same all-reduce must stay in flight after a peer is seen dead before this rank
# ends (see _watchdog).
_DEAD_GRACE_S = 5.0
_TIMEOUT_S = dist.constants.default_pg_timeout.total_seconds()  # gloo's default: 30 min
# A build lock older than this was left by a build that stopped (the kernel builds in about
# 30-60 s on 2 cores): loading would wait for it forever.
_STALE_LOCK_S = 600.0


def _shm_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` (any shape, contiguous CPU tensor) over every rank of the world, by
    DeepSpeed's shared-memory kernel; every rank gets the same bits. Only called on groups
    :func:`setup` accepted."""
    _KERNEL["inflight"] = time.monotonic()
    try:
        return torch.ops.deepspeed.inference_all_reduce(x)
    finally:
        _KERNEL["inflight"] = None


def _shm_all_reduce_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# The op the rewritten graphs call: ``tp_backend::shm_all_reduce(Tensor x) -> Tensor``.
shm_all_reduce = plain_op("tp_backend::shm_all_reduce", _shm_all_reduce, _shm_all_reduce_fake)


def _gathered_shape(x: torch.Tensor, dim: int, tp_size: int) -> list:
    shape = list(x.shape)
    shape[dim] = shape[dim] * tp_size
    return shape


def _shm_all_gather(x: torch.Tensor, dim: int, pieces: list[int],
                    tp_size: int) -> torch.Tensor:
    """All-gather through the shared-memory all-reduce: ``x`` holds, along ``dim``, this
    rank's chunk of each of ``len(pieces)`` blocks (chunk sizes ``pieces``; one piece for a
    plain shard); returns the whole tensor (``N`` times longer along ``dim``).

    Each rank writes its chunks where they belong in a buffer of the whole shape, zeros
    elsewhere, and the buffer is summed in place over the world: every element is one
    rank's value plus zeros, so the gathered values are exact (a -0.0 comes back as +0.0)
    and already in place (no transpose after the collective, unlike an all-gather's
    ``[N, *local]``). Only the other ranks' parts are zeroed (the buffer is written once;
    for the ``[512, 49152]`` full logits of SmolLM2 at TP=2, 42 against 43.5 ms to fill a
    fresh buffer, most of it the page faults of its first touch).
    Measured here at TP=2 against gloo's all-gather (the functional collective and its
    transpose): 0.12 against 0.41 ms for 0.12 MiB gathered, 2.6 against 6.8 ms for
    7.8 MiB, 53 against 155 ms for 63 MiB (full logits of 512 tokens of a 32064 vocab).

    The rank is read when the op runs (the kernel's group is the world, so the rank in the
    world is the rank in the group): the traced graph is the same on every rank."""
    tp_rank = dist.get_rank()
    out = x.new_empty(_gathered_shape(x, dim, tp_size))
    src = dst = 0
    for p in pieces:
        mine = dst + tp_rank * p
        out.narrow(dim, dst, mine - dst).zero_()
        out.narrow(dim, mine, p).copy_(x.narrow(dim, src, p))
        out.narrow(dim, mine + p, dst + tp_size * p - mine - p).zero_()
        src += p
        dst += tp_size * p
    _KERNEL["inflight"] = time.monotonic()
    try:
        torch.ops.deepspeed.inference_all_reduce_(out)
    finally:
        _KERNEL["inflight"] = None
    return out


def _shm_all_gather_fake(x, dim, pieces, tp_size):
    return x.new_empty(_gathered_shape(x, dim, tp_size))


# ``tp_backend::shm_all_gather(Tensor x, int dim, int[] pieces, int tp_size) -> Tensor``.
shm_all_gather = plain_op("tp_backend::shm_all_gather", _shm_all_gather, _shm_all_gather_fake)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel can sum ``x``: a CPU tensor of float32, or of bfloat16/float16
    where the CPU has AVX-512 (the kernel's bf16/fp16 paths need it)."""
    if x.device.type != "cpu":
        return False
    need = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}.get(x.dtype)
    return need is not None and _KERNEL["level"] >= need


def setup(group, mode: str) -> bool:
    """Decide whether all-reduces over ``group`` use the shared-memory kernel; builds and
    initialises it the first time. A collective: every rank of ``group`` must call it, and
    every rank gets the same answer (cached per group afterwards).

    Args:
        group: the tensor-parallel ``ProcessGroup``.
        mode: ``"auto"`` (use it where it works, else the group's all-reduce, with an info
            log line saying why), ``"shm"`` (require it) or ``"group"`` (never).

    Raises:
        TPOptionsError: ``mode="shm"`` and the kernel cannot serve ``group`` (the message
            says why), on every rank.
    """
    if mode == "group" or group.size() < 2:
        return False
    name = group.group_name
    if name in _SERVED:
        if mode == "shm" and not _SERVED[name]:
            _refuse(group, "it was found unusable for this group earlier")
        return _SERVED[name]
    why = _local_obstacle(group)
    where: list = [None] * group.size()
    dist.all_gather_object(where, where_am_i(), group=group)
    hosts = crowded_hosts(where)
    if why is None and len(hosts) > 1:
        why = f"the ranks are on {len(hosts)} hosts"
    elif why is None and any(hosts.values()):
        # The kernel waits by spinning: with more ranks than CPUs a waiting rank burns the
        # time slice its peer needs (measured: no faster than gloo at 3 and 4 ranks on 2).
        cpus = frozenset().union(*(c for _, c in where))
        why = f"{group.size()} ranks share {len(cpus)} CPUs and the kernel waits by spinning"
    if why is None:
        why = _import_obstacle()
    if any_rank(why is not None, group):
        return _decline(group, mode, why or "another rank cannot use it", logging.INFO)
    try:
        if not _KERNEL["ready"]:
            _initialise(group)
    except Exception as e:  # noqa: BLE001 - a build failure falls back, on every rank
        why = f"it could not be built or initialised: {type(e).__name__}: {e}"
    if any_rank(why is not None, group):
        return _decline(group, mode, why or "another rank could not build or initialise it",
                        logging.WARNING)
    log.info("tp_auto: all-reduces over tp_group %s (%d ranks, one host) use DeepSpeed's "
             "shared-memory kernel", name, group.size())
    _SERVED[name] = True
    return True


def _decline(group, mode: str, why: str, level: int) -> bool:
    """The group's own all-reduce, agreed by every rank: ``mode="shm"`` raises, else the
    reason is logged at ``level`` and remembered for the group. Returns False."""
    if mode == "shm":
        _refuse(group, why)
    log.log(level, "tp_auto: all-reduces over tp_group %s use the group's backend "
            "(DeepSpeed's shared-memory all-reduce is not used: %s)", group.group_name, why)
    _SERVED[group.group_name] = False
    return False


def _refuse(group, why: str):
    raise TPOptionsError(
        f"tp_auto option all_reduce='shm': DeepSpeed's shared-memory all-reduce cannot serve "
        f"tp_group {group.group_name} ({why}). It needs every rank of the world in tp_group, "
        "on one Linux host, one CPU per rank, gloo, and deepspeed (tp_backend's shm extra); use "
        "all_reduce='auto' to fall back to the group's all-reduce.")


def where_am_i() -> tuple[str, frozenset]:
    """This process's host name and the CPUs it may run on (its affinity)."""
    return socket.gethostname(), _cpus()


def crowded_hosts(where: list) -> dict[str, bool]:
    """For ``where``, a :func:`where_am_i` per rank: each host named, and whether it runs
    more ranks than it has CPUs (the union of those ranks' affinities), so that a rank
    there waits for a time slice while another runs."""
    out = {}
    for host in {h for h, _ in where}:
        ranks = [c for h, c in where if h == host]
        out[host] = len(ranks) > len(frozenset().union(*ranks))
    return out


def _cpus() -> frozenset:
    """The CPUs this process may run on."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: _local_obstacle refuses anyway
        return frozenset(range(os.cpu_count() or 1))


def _local_obstacle(group) -> str | None:
    """Why this rank cannot use the kernel for ``group``, or None."""
    if sys.platform != "linux":
        return f"the kernel is Linux-only (platform {sys.platform})"
    if "gloo" not in str(dist.get_backend(group)):
        return f"the group's backend is {dist.get_backend(group)}, not gloo"
    if group.size() != dist.get_world_size():
        return (f"the kernel spans the whole world and tp_group has {group.size()} of the "
                f"world's {dist.get_world_size()} ranks")
    return None


def _import_obstacle() -> str | None:
    """Why deepspeed's kernel cannot be loaded here, or None (imports deepspeed: 0.4 s)."""
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, or broken: the gloo path runs
        return (f"deepspeed is not importable ({type(e).__name__}: {e}); install "
                "tp_backend's shm extra: pip install -e '.[shm]'")
    if not _KERNEL["ready"] and _deepspeed_comm_initialised():
        return "deepspeed.comm was initialised by the application and owns the kernel"
    return None


def _deepspeed_comm_initialised() -> bool:
    try:
        import deepspeed.comm as ds_comm
    except Exception:  # noqa: BLE001
        return False
    return bool(ds_comm.is_initialized())


def _initialise(group):
    """Build the kernel (once per machine), map every rank's shared-memory buffer, then
    unlink the buffers' names (the mappings stay valid; nothing is left in /dev/shm when the
    processes end), and start the watchdog."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if not builder.is_compatible():
        raise RuntimeError("DeepSpeed says its shared-memory kernel is not compatible here")
    stale = _stale_build_lock(builder.name)
    if stale is not None:
        path, age = stale
        raise RuntimeError(
            f"the build lock {path} is {age:.0f} s old, left by a build that was stopped, and "
            f"torch's extension loader would wait for it forever; delete its directory "
            f"(rm -r {os.path.dirname(path)}) and the kernel rebuilds on the next run (about "
            "a minute)")
    t0 = time.perf_counter()
    module = builder.load(verbose=False)
    log.info("tp_auto: DeepSpeed's shared-memory all-reduce loaded in %.1f s",
             time.perf_counter() - t0)
    level = module.vector_kernel_level() if hasattr(module, "vector_kernel_level") else 1
    if level < 1:
        raise RuntimeError("the CPU lacks AVX2, which the kernel's float32 path needs")
    # The kernel names its buffers after MASTER_ADDR and MASTER_PORT and only maps them when
    # LOCAL_SIZE equals the world size (without it, it would fault on first use): give it a
    # name no other job on this host uses.
    token = [f"{os.getpid()}x{secrets.token_hex(4)}"]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    world, rank = dist.get_world_size(), dist.get_rank()
    with _environ(LOCAL_SIZE=str(world), MASTER_ADDR="tp_backend", MASTER_PORT=token[0]):
        module.initialize(world, rank)
    dist.barrier(group=group)  # every rank has mapped every buffer
    for path in glob.glob(f"/dev/shm/*_tp_backend_{token[0]}_{rank}"):
        os.unlink(path)
    pids: list = [None] * group.size()
    dist.all_gather_object(pids, os.getpid(), group=group)
    _KERNEL.update(ready=True, level=level, peers=tuple(p for p in pids if p != os.getpid()))
    threading.Thread(target=_watchdog, name="tp_backend-shm-watchdog", daemon=True).start()


def _stale_build_lock(name: str) -> tuple[str, float] | None:
    """``(path, age in seconds)`` of a lock file of extension ``name``'s build directory
    older than any build takes (``_STALE_LOCK_S``), or ``None``. torch's extension loader
    (``torch.utils.cpp_extension.load``, which DeepSpeed's builder calls) takes that lock
    while it builds and, finding it taken, waits until the file goes: a build killed
    midway leaves it behind, and every later load would wait forever. The directory is
    ``$TORCH_EXTENSIONS_DIR/name``, else ``name`` under one of the per-Python subfolders of
    ``torch.utils.cpp_extension.get_default_build_root()``."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    paths = ([os.path.join(root, name, "lock")] if root else
             glob.glob(os.path.join(get_default_build_root(), "*", name, "lock")))
    now = time.time()
    for path in paths:
        try:
            age = now - os.path.getmtime(path)
        except OSError:  # no lock, or the build that held it just finished
            continue
        if age > _STALE_LOCK_S:
            return path, age
    return None


@contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie -- exited, not yet reaped -- does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _watchdog():
    """Ends this rank when the all-reduce in flight cannot finish: a peer process has
    exited and, ``_DEAD_GRACE_S`` later, the same all-reduce is still in flight, or it has
    waited torch.distributed's default timeout. The grace matters: a peer that finished this
    all-reduce before us may exit at once (its last collective), while this rank's main
    thread is still on its way out of the kernel (descheduled, or waiting for the GIL to
    clear ``inflight``); ending this rank then would turn a finished run into a failure."""
    suspect = None  # (start of the all-reduce in flight, when a dead peer was first seen)
    while True:
        time.sleep(0.5)
        start = _KERNEL["inflight"]
        if start is None or time.monotonic() - start < _WATCHDOG_AFTER_S:
            suspect = None
            continue
        dead = [p for p in _KERNEL["peers"] if not _alive(p)]
        now = time.monotonic()
        waited = now - start
        if dead and (suspect is None or suspect[0] != start):
            suspect = (start, now)  # look again after the grace
        if waited > _TIMEOUT_S or (dead and now - suspect[1] >= _DEAD_GRACE_S):
            why = (f"a peer rank (process {dead[0]}) exited" if dead else
                   f"the peers did not join for {waited:.0f} s (torch.distributed's default "
                   "timeout)")
            msg = (f"tp_auto: {why} during a shared-memory all-reduce; ending this rank "
                   f"(process {os.getpid()}) with exit code 1 instead of waiting forever")
            log.critical(msg)  # without a handler, logging prints it on stderr
            os._exit(1)
