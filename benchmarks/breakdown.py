"""Where the time goes, per rank (issue 17 item 1, issue 21 item 2): ``tp_auto`` against
DeepSpeed AutoTP at TP=2 on a benchmark model of ``forward.py`` (the random Llama, or
SmolLM2-135M), one thread per rank.

    python benchmarks/breakdown.py [--model llama|smollm2]
        [--impl tp_auto tp_auto/head tp_auto/balance ds_autotp]
        [--reps 5] [--decode-steps 8]

Rows: ``tp_auto`` (default options), ``tp_auto/head`` (``lm_head="replicate"``: the LM head
whole on every rank, as DeepSpeed keeps it), ``tp_auto/balance`` (``balance="work"``:
uneven splits evened out) and ``ds_autotp``.

Phases: a full-logits forward at S=512 (``use_cache=False``), the prefill ``generate``
runs at S=512 (KV cache on, last-token logits), and one decode step (one new token on a
KV cache of 128 positions; the median of ``--decode-steps`` consecutive steps).

For each phase the wall time is the median of ``--reps`` unprofiled calls. One more call
runs under ``torch.profiler`` and its self CPU time (time in an op minus the ops it
called) is summed per category, from the op names:

* ``matmul``: ATen's ``mm``/``addmm``/``bmm``/``baddbmm`` and ``tp_backend::onednn_linear``
  (oneDNN);
* ``attention``: scaled dot-product attention (``tp_backend::sdpa`` and ATen's kernels);
* ``all-reduce``: ``tp_backend::shm_all_reduce`` and DeepSpeed's ``inference_all_reduce``
  (the same shared-memory kernel: its time includes waiting for the other rank, which
  the kernel does not report apart), gloo's ``c10d::allreduce_``;
* ``all-gather``: ``tp_backend::shm_all_gather`` (``tp_auto``'s logits: a zero buffer
  summed by the same kernel; the ops it runs inside count here too), gloo's all-gather
  and the functional collectives' ``wait_tensor``. DeepSpeed splits the LM head by rows
  (its ``LmHeadLinearAllreduce``) and all-reduces the logits instead;
* ``fused (Inductor)``: the C++ kernels Inductor generated (``graph_<i>_cpp_fused_*``;
  kernel profiling is switched on for this script);
* ``other ops``: every other ATen op (embedding, norms and activations in DeepSpeed's
  eager model, copies);
* ``runner``: ``tp_auto``'s Python around the local graph (``_Runner.__call__`` less the
  graph, as ``overhead.py`` measures), recorded in a ``record_function`` range this script
  adds;
* ``Python, not in an op``: the profiled wall time less all of the above (the model's
  Python in DeepSpeed's eager forward; Dynamo's guards and Inductor's wrapper code in
  ``tp_auto``'s).

The profiler adds a few µs per op, so profiled times run above the wall time; the table
gives each category as a share of the profiled call, then in ms scaled to the unprofiled
wall time. Prints the table and writes ``benchmarks/results/breakdown-<model>-tp2.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import deepspeed_autotp, print_result, run_child, wrap_runner, write_json  # noqa: E402

CATEGORIES = ("matmul", "attention", "all-reduce", "all-gather", "fused (Inductor)",
              "other ops", "runner", "Python, not in an op")
PHASES = ("full logits 512", "prefill 512", "decode step")


def category(name: str) -> str | None:
    """The category of a profiler event name (``None``: a range with no time of its own to
    count, such as Dynamo's and Inductor's wrappers, whose self time is Python)."""
    if name == "tp_auto runner":
        return "runner"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") or \
            name.startswith("tp_backend::onednn_linear") or name.startswith("mkldnn::"):
        return "matmul"
    if "sdpa" in name or "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "shm_all_reduce" in name or "inference_all_reduce" in name or "allreduce" in name \
            or "all_reduce" in name:
        return "all-reduce"
    if "allgather" in name or "all_gather" in name or "wait_tensor" in name:
        return "all-gather"
    if "cpp_fused" in name:  # graph_<i>_cpp_fused_<ops>_<n>
        return "fused (Inductor)"
    if name.startswith("aten::") or name.startswith("c10d::") or "::" in name:
        return "other ops"
    return None


def _outer_collective(ev) -> str | None:
    """The category of the collective op ``ev`` runs inside, if any: the zero fill, copies
    and kernel call of ``tp_backend::shm_all_gather`` count as the all-gather."""
    a = ev.cpu_parent
    while a is not None:
        cat = category(a.name)
        if cat in ("all-reduce", "all-gather"):
            return cat
        a = a.cpu_parent
    return None


def _instrument_runner():
    """A ``record_function`` range around ``tp_auto``'s runner, with the local graph's own
    call in a nested range, so the runner's self time is its Python alone."""
    import torch

    wrap_runner(lambda runner: torch.profiler.record_function("tp_auto runner"),
                lambda: torch.profiler.record_function("tp_auto local graph"))


def _profile(fn) -> tuple[float, dict]:
    """Wall ms of one profiled call of ``fn`` and self ms per category."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = 1e3 * (time.perf_counter() - t0)
    per = dict.fromkeys(CATEGORIES, 0.0)
    if os.environ.get("BREAKDOWN_EVENTS"):  # the raw events, to check the categories
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    for ev in prof.events():
        cat = _outer_collective(ev) or category(ev.name)
        if cat is not None:
            per[cat] += ev.self_cpu_time_total / 1e3
    per["Python, not in an op"] = max(wall - sum(per.values()), 0.0)
    return wall, per


def run_one(impl: str, model_name: str, reps: int, decode_steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from forward import checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    path = checkpoint(model_name)
    if impl.startswith("tp_auto"):
        import torch._inductor.config as inductor_config

        import tp_backend

        inductor_config.cpp.enable_kernel_profile = True
        _instrument_runner()
        model = tp_backend.parallelize_model(
            path, lm_head="replicate" if impl == "tp_auto/head" else "split",
            balance="work" if impl == "tp_auto/balance" else "off")
    else:
        model, why = deepspeed_autotp(path, tp)
        if model is None:
            dist.destroy_process_group()
            return {"skipped": why} if rank == 0 else {}
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids512 = torch.randint(0, vocab, (1, 512), generator=gen)
    prompt = torch.randint(0, vocab, (1, 128), generator=gen)
    res = {}
    with torch.no_grad():
        calls = {"full logits 512": lambda: model(input_ids=ids512, use_cache=False),
                 "prefill 512": lambda: model(input_ids=ids512, logits_to_keep=1)}
        for phase, fn in calls.items():
            for _ in range(2):  # compile, then one warm call
                fn()
            walls = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                walls.append(1e3 * (time.perf_counter() - t0))
            prof_wall, per = _profile(fn)
            res[phase] = {"wall_ms": statistics.median(walls), "profiled_ms": prof_wall,
                          "self_ms": per}

        # Decode: steps on a growing cache. The first steps compile (the first decode
        # graph, then the dynamic-length one); then timed and profiled steps alternate.
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal tok
            o = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = o.logits[:, -1:].argmax(-1)

        for _ in range(4):
            step()
        walls, profs = [], []
        for _ in range(decode_steps):
            t0 = time.perf_counter()
            step()
            walls.append(1e3 * (time.perf_counter() - t0))
            profs.append(_profile(step))
        prof_wall = statistics.median(w for w, _ in profs)
        per = {c: statistics.median(p[c] for _, p in profs) for c in CATEGORIES}
        res["decode step"] = {"wall_ms": statistics.median(walls), "profiled_ms": prof_wall,
                              "self_ms": per}
    every = [None] * tp
    dist.all_gather_object(every, res)
    dist.destroy_process_group()
    return {"ranks": every} if rank == 0 else {}


def print_table(rows: dict) -> None:
    for phase in PHASES:
        print(f"\n{phase}: ms per call (wall, unprofiled median), then per category: ms scaled "
              "from its share of one profiled call")
        print(f"{'impl':12s} {'rank':>4s} {'wall':>7s} " +
              " ".join(f"{c[:12]:>12s}" for c in CATEGORIES))
        for impl, r in rows.items():
            if "ranks" not in r:
                print(f"{impl:12s} {r.get('skipped') or r.get('error')}")
                continue
            for rank, res in enumerate(r["ranks"]):
                ph = res[phase]
                scale = ph["wall_ms"] / ph["profiled_ms"]
                cells = " ".join(f"{ph['self_ms'][c] * scale:12.2f}" for c in CATEGORIES)
                print(f"{impl:12s} {rank:4d} {ph['wall_ms']:7.1f} {cells}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama", choices=("llama", "smollm2"))
    ap.add_argument("--impl", nargs="+", default=["tp_auto", "ds_autotp"],
                    choices=("tp_auto", "tp_auto/head", "tp_auto/balance", "ds_autotp"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        out = run_one(a.child, a.model, a.reps, a.decode_steps)
        if out:
            print_result(out)
        return
    rows = {}
    for impl in a.impl:
        rows[impl] = run_child(os.path.abspath(__file__),
                               ["--child", impl, "--model", a.model, "--reps", str(a.reps),
                                "--decode-steps", str(a.decode_steps)], tp=2)
    print_table(rows)
    write_json(rows, os.path.join(HERE, "results", f"breakdown-{a.model}-tp2.json"))


if __name__ == "__main__":
    main()
