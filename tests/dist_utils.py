"""Run a function on N CPU processes with a gloo process group (file:// rendezvous, no
fixed ports) and collect each rank's return value.

``TP_TEST_DEVICE=cuda`` runs the ranks' tensors on the GPU instead (one device shared by
every rank, still through gloo, since NCCL refuses two ranks on one device): each worker
makes it torch's default device (``torch.set_default_device``), turns TF32 off so fp32
tolerances hold, and returns its results moved to CPU."""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def test_device() -> str | None:
    """The device ``TP_TEST_DEVICE`` names (``cuda``), or ``None`` for CPU."""
    return os.environ.get("TP_TEST_DEVICE") or None


def _use_test_device() -> None:
    device = test_device()
    if device is None:
        return
    torch.set_default_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _to_cpu(result):
    if test_device() is None:
        return result
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, result)


# Workers start from a fork server that has imported these once (``multiprocessing``'s
# forkserver start method with preloaded modules): each worker is still a fresh process,
# but skips the 4-5 s of importing torch, transformers, Dynamo and DeepSpeed's op builder
# (``_PRELOAD_IF_IMPORTABLE``) that a spawned one spends, most of a small test's time. The
# server is started once per pytest process and forks from its own state, not the test's:
# a test that has changed the environment since then (``monkeypatch.setenv``; some settings
# are read when a module is imported) gets spawned workers instead, which see it.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx",
            "transformers", "transformers.models.llama.modeling_llama",
            "transformers.models.gpt2.modeling_gpt2", "tp_backend", "tp_backend.backend"]
# What tp_backend.shm imports on a rank's first graph where the shared-memory all-reduce may
# serve (0.2-0.4 s a rank), preloaded only where this process can import it: the server
# skips a module that raises ImportError, but any other error would end the server.
_PRELOAD_IF_IMPORTABLE = ["deepspeed.ops.op_builder.cpu"]
_SERVER: dict = {}


def _context():
    """The ``multiprocessing`` context to start workers with (see ``_PRELOAD``)."""
    if not _SERVER:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD + [m for m in _PRELOAD_IF_IMPORTABLE
                                               if _importable(m)])
        _SERVER.update(ctx=ctx, environ=_environ())
    if _environ() != _SERVER["environ"]:
        return mp.get_context("spawn")
    return _SERVER["ctx"]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - not installed or broken: the ranks import it themselves
        return False
    return True


def _environ() -> dict:
    """The environment, less what pytest itself sets for each test."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


# The downstream compiler tp_auto graphs get where a test names none (``options=
# {"compiler": ...}``): set for each test by tests/conftest.py, ``"eager"`` unless the test
# is marked ``inductor`` or pytest runs with ``--downstream inductor``; ``None`` leaves the
# library's default (Inductor). Handed to the workers with each call.
DEFAULT_COMPILER: str | None = None


def _default_compiler(compiler: str | None) -> None:
    """Make ``compiler`` the default of the ``compiler`` option in this worker (the rewritten
    graphs run as they are, skipping Inductor's compile, about 3x a small test's time).
    Every check but those of the downstream compile itself holds for either; those tests are
    marked ``inductor`` and run with the library's own default."""
    if compiler is not None:
        from tp_backend import options

        options._DEFAULTS["compiler"] = compiler


def _worker(rank, world_size, init_file, out_dir, fn, args, compiler=None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _use_test_device()
    _default_compiler(compiler)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=180))
        try:
            result = _to_cpu(fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()}, result_path)


def run_distributed(fn, world_size: int, *args):
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own
    process inside an initialised gloo group. Raises ``RuntimeError`` with the traceback
    of the first failing rank. ``fn`` must be importable (a module-level function)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(world_size, init_file, tmp, fn, args,
                                                DEFAULT_COMPILER),
                                 nprocs=world_size, join=False,
                                 start_method=_context().get_start_method())
        try:
            while not ctx.join(timeout=600):
                pass
        except mp.ProcessExitedException as e:
            # A rank that raised wrote its error before exiting cleanly; the rank that
            # exited non-zero is often only its peer, ended while waiting for it.
            outs = _recorded(tmp, world_size)
            _raise_recorded_error(outs)
            if None in outs:
                raise
            # Every rank finished fn and saved its result before one died on the way out
            # (a C++ thread of the process group aborting at interpreter exit: "terminate
            # called without an active exception"); the results are whole, so use them.
            warnings.warn(f"a test rank died after saving its result ({e}); results kept")
        else:
            outs = _recorded(tmp, world_size)
            _raise_recorded_error(outs)
            if None in outs:
                raise RuntimeError(f"rank {outs.index(None)} exited without saving a result")
        return [out["result"] for out in outs]


def _recorded(tmp: str, world_size: int) -> list:
    """What each rank saved (``{"ok": ...}``), ``None`` for a rank that saved nothing."""
    paths = [os.path.join(tmp, f"rank{rank}.pt") for rank in range(world_size)]
    return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]


def _raise_recorded_error(outs: list) -> None:
    """Raise the first error a rank recorded (``outs``: :func:`_recorded`)."""
    for rank, out in enumerate(outs):
        if out is not None and not out["ok"]:
            raise RuntimeError(f"rank {rank} failed: {out['error']}\n{out['traceback']}")


def run_each(fn, world_size: int, *args, timeout: float = 300):
    """Like :func:`run_distributed`, but a rank that exits does not stop the others: waits
    for every process (up to ``timeout`` seconds each) and returns, per rank, ``("ok",
    result)``, ``("error", message)``, ``("exit", exit code)`` (no result written) or
    ``("hang", None)`` (still running at the timeout; then killed)."""
    ctx = _context()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker,
                             args=(r, world_size, init_file, tmp, fn, args, DEFAULT_COMPILER))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out = []
        for rank, p in enumerate(procs):
            p.join(timeout)
            path = os.path.join(tmp, f"rank{rank}.pt")
            if p.is_alive():
                p.kill()
                p.join()
                out.append(("hang", None))
            elif os.path.exists(path):
                res = torch.load(path, weights_only=False)
                out.append(("ok", res["result"]) if res["ok"] else ("error", res["error"]))
            else:
                out.append(("exit", p.exitcode))
        return out


def log_records(logger: str = "tp_backend") -> list:
    """A list that collects every record ``logger`` emits in this process from now on (call
    it inside a worker: records are per process)."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(logger).addHandler(handler)
    return records
