"""Shared by the benchmark scripts: run one configuration in a child process (so each
gets a fresh process, thread setting and process group) and save the results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile


def run_child(script: str, args: list, tp: int = 1, fresh_inductor_cache: bool = False,
              torchrun: bool | None = None) -> dict:
    """Run ``script args`` (under torchrun with ``tp`` processes if ``tp > 1`` or
    ``torchrun``) and return
    the JSON it printed after ``RESULT`` (rank 0), or ``{"error": the line naming the error,
    "stderr_tail": the last 40 lines of stderr}``.
    ``fresh_inductor_cache``: an empty ``TORCHINDUCTOR_CACHE_DIR`` (cold compiles)."""
    env = dict(os.environ)
    tmp = None
    if fresh_inductor_cache:
        tmp = tempfile.TemporaryDirectory(prefix="inductor-cache-")
        env["TORCHINDUCTOR_CACHE_DIR"] = tmp.name
    cmd = [sys.executable, script, *args]
    if torchrun or (torchrun is None and tp > 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
               script, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        if tmp is not None:
            tmp.cleanup()
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if line:
        return json.loads(line[-1][len("RESULT "):])
    return {"error": _error_line(proc.stderr),
            "stderr_tail": "\n".join(proc.stderr.splitlines()[-40:])}


def print_result(result) -> None:
    """Print ``result`` (anything ``json.dumps`` takes) as the ``RESULT`` line that
    :func:`run_child` reads back from a child run, flushed at once so that a child killed
    later still leaves it behind."""
    print("RESULT " + json.dumps(result), flush=True)


def _error_line(stderr: str) -> str:
    """The line of a failed child's stderr that names the error: the last one that reads
    ``SomethingError: ...`` (torchrun ends with a banner of ``=`` that says nothing; a
    ``[rankN]:`` prefix is dropped), else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", l.strip()) for l in stderr.splitlines()]
    lines = [l for l in lines if l] or ["no output"]
    named = [l for l in lines if re.match(r"^[\w.]*(Error|Exception)\b", l)
             or "Signal" in l and "died" in l]
    return (named or lines)[-1][:300]


def wrap_runner(around_call, around_graph) -> None:
    """Instrument ``tp_auto``'s runner (``tp_backend.backend._Runner``) in this process:
    each call runs inside the context manager ``around_call(runner)``, and the compiled
    local graph it calls inside ``around_graph()``, so a benchmark can tell the runner's
    own Python from the graph's time."""
    from tp_backend import backend

    plain_call = backend._Runner.__call__

    def wrap_graph(run):
        def call(*a):
            with around_graph():
                return run(*a)
        call.tp_bench_wrapped = True
        return call

    def call(self, *args):
        c = self.compiled
        if not getattr(c.run, "tp_bench_wrapped", False):
            c.run = wrap_graph(c.run)
        with around_call(self):
            return plain_call(self, *args)

    backend._Runner.__call__ = call


def write_json(rows: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {path}")


def deepspeed_autotp(path: str, tp: int):
    """``(model, None)``: the checkpoint under DeepSpeed AutoTP over the world (the process
    group initialised), or ``(None, why)`` where deepspeed is missing or fails (the caller
    skips the row). tp_backend's shared-memory all-reduce is set up first, so DeepSpeed
    uses the same kernel, initialised by tp_backend (which unlinks its files in /dev/shm;
    DeepSpeed's own initialisation leaves them there)."""
    try:
        import deepspeed
    except ImportError as e:
        return None, f"deepspeed is not installed ({e}); pip install -e '.[shm]'"
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tp_backend import shm

    shm.setup(dist.group.WORLD, "auto")

    # Without LOCAL_SIZE DeepSpeed's CPU kernel is left unmapped and faults on first use.
    os.environ.setdefault("LOCAL_SIZE", str(tp))
    try:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp},
                                          dtype=torch.float32, replace_with_kernel_inject=False)
    except Exception as e:  # noqa: BLE001 - a benchmark row, not the product
        return None, f"deepspeed.init_inference failed: {type(e).__name__}: {e}"
    return engine.module, None
