"""Side-by-side speed-up: single process, ``tp_auto`` and transformers' ``tp_plan="auto"``
measured in alternating rounds of one torchrun job, so every ratio compares timings taken
moments apart under the same machine load.

    torchrun --nproc-per-node 2 benchmarks/paired.py [--model llama] [--rounds 7]
        [--out benchmarks/results/paired-llama-tp2.json]

``benchmarks/forward.py`` runs each configuration in its own process, one after another;
on a shared machine the load drifts between those runs by more than the effects measured
(its single-process baseline moved 15 % between two runs). Here every rank holds all the
models, and each round times, in turn:

* ``eager x1`` -- the unsharded model, eager, on rank 0 with 1 thread (the other ranks
  wait in a barrier, which uses no CPU): the baseline of the speed-up target;
* ``eager xN`` -- the same on rank 0 with ``N = tp_size`` threads: one process on as many
  cores as the TP job uses;
* ``tp_auto x1`` -- ``parallelize_model`` on a one-rank group, rank 0, 1 thread: the same
  downstream compile (Inductor, fp32 matmuls on oneDNN) without the split, so ``tp_auto``
  against it is the parallel efficiency with the kernels held equal;
* ``tp_auto xN`` -- the same one-rank model with ``N`` threads (compiled under ``N``
  threads: Inductor's CPU kernels are specialised on the thread count): one process on all
  the cores the TP job uses, with the same kernels -- the row a user with one CPU would
  pick instead of tensor parallelism;
* ``tp_auto`` -- ``parallelize_model`` (Inductor, oneDNN matmuls: the defaults), 1 thread
  per rank;
* ``tp_auto/gloo`` -- the same with ``all_reduce="group"``: gloo's all-reduce instead of
  DeepSpeed's shared-memory kernel (``tp_auto`` uses it where it can, ``tp_backend.shm``);
* ``tp_auto/head`` -- the same with ``lm_head="replicate"``: the LM head whole on every
  rank, no logits all-gather (as DeepSpeed AutoTP keeps it);
* ``tp_auto/aten`` -- the same with ``cpu_matmul="aten"`` (ATen's matmul, MKL, as eager
  and transformers use): isolates the split from the kernel choice;
* ``hf_tp`` -- transformers ``from_pretrained(..., tp_plan="auto")``, 1 thread per rank;
* ``ds_autotp`` -- DeepSpeed AutoTP, ``deepspeed.init_inference(model, tensor_parallel=
  {"tp_size": N}, dtype=torch.float32, replace_with_kernel_inject=False)``, 1 thread per
  rank: the fastest tensor-parallel peer on CPU (issue 21). Its all-reduces use the same
  shared-memory kernel as ``tp_auto`` (initialised once per process, by ``tp_backend`` here
  first). Skipped, with a one-line note, where deepspeed is not installed (the ``shm``
  extra) or ``init_inference`` fails.

Workloads (the ones ``forward.py`` defines): prefill at S=128 and S=512 (KV cache on,
last-token logits, which is what ``generate`` runs), a full-logits forward at S=512 (no
cache: every position's logits, what a training or scoring forward computes), and greedy
decode tokens/s (32 new tokens after a 32-token prompt, minus a 1-token run, so the
prefill is excluded). ``--impls`` times a subset of the rows (``eager x1``, the baseline,
always runs). A
barrier before and after each timing keeps the ranks in step, and the rows take turns at
running first (round ``k`` starts at the ``k``-th row), so no row's place in the round
favours it.

Reported per workload: the median and minimum time of each implementation over the
rounds, the median over rounds of the per-round speed-up against ``eager x1`` (prefill:
time ratio; decode: tokens/s ratio), and the median per-round ratio of each ``tp_auto``
row vs ``hf_tp``. Each round uses fresh timings of every implementation, so a slow spell of the
machine moves both sides of a ratio together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from _common import deepspeed_autotp, print_result, write_json
from forward import NEW_TOKENS, SEQS, checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def _timed(fn, rank: int, only_rank0: bool) -> float | None:
    """Wall seconds of ``fn()`` on this rank (``None`` where it did not run), between
    barriers so every rank starts together and no rank runs ahead into the next timing."""
    dist.barrier()
    t = None
    if not only_rank0 or rank == 0:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
    dist.barrier()
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama", choices=("llama", "smollm2"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--impls", nargs="+", default=None, metavar="ROW",
                    help="time only these rows (e.g. tp_auto tp_auto/head ds_autotp); "
                         "'eager x1' always runs")
    args = ap.parse_args()
    want = (lambda impl: True) if args.impls is None else (
        lambda impl: impl in args.impls or impl == "eager x1")

    import tp_backend
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    # Set up the shared-memory all-reduce before DeepSpeed initialises its communication,
    # so both use the one kernel (the first to initialise it owns it; tp_backend does not
    # share one that deepspeed.comm set up).
    from tp_backend import shm

    shm.setup(dist.group.WORLD, "auto")
    if rank == 0:
        path = checkpoint(args.model)  # creates the random Llama once
    dist.barrier()
    path = checkpoint(args.model)
    cfg = AutoConfig.from_pretrained(path)
    # Five compiled instances of one forward (several graphs each) exceed Dynamo's default
    # recompile limit of 8 per code object, past which it would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    builders = {"tp_auto": lambda: tp_backend.parallelize_model(path),
                "tp_auto/gloo": lambda: tp_backend.parallelize_model(path, all_reduce="group"),
                "tp_auto/head": lambda: tp_backend.parallelize_model(path, lm_head="replicate"),
                "tp_auto/aten": lambda: tp_backend.parallelize_model(path, cpu_matmul="aten"),
                "hf_tp": lambda: AutoModelForCausalLM.from_pretrained(path,
                                                                      tp_plan="auto").eval()}
    models = {impl: build() for impl, build in builders.items() if want(impl)}
    ds_model = None
    if want("ds_autotp"):
        ds_model, ds_note = deepspeed_autotp(path, tp)
        if ds_model is not None:
            models["ds_autotp"] = ds_model
        elif rank == 0:
            print(f"ds_autotp row skipped: {ds_note}", flush=True)
    # Every rank builds its own one-rank tp_auto model and compiles it in the warm-up round
    # (only rank 0 times it): Dynamo's automatic dynamic shapes are decided per code object
    # from every size it has seen, so a rank that had compiled more graphs of the same
    # forward would mark other dims dynamic, compile other graphs than its peers and
    # desynchronise the ranks' collectives (check_inputs' all-gather on first calls).
    solos = [dist.new_group([r]) for r in range(tp)]  # collective: every rank calls each
    for impl in ("tp_auto x1", f"tp_auto x{tp}"):
        if want(impl):
            models[impl] = tp_backend.parallelize_model(path, tp_group=solos[rank])
    if rank == 0:
        models["eager x1"] = models[f"eager x{tp}"] = AutoModelForCausalLM.from_pretrained(path).eval()
    impls = tuple(impl for impl in ("eager x1", f"eager x{tp}", "tp_auto x1", f"tp_auto x{tp}",
                                    "tp_auto", "tp_auto/gloo", "tp_auto/head", "tp_auto/aten",
                                    "hf_tp", "ds_autotp")
                  if want(impl) and (impl != "ds_autotp" or ds_model is not None))
    threads = {impl: 1 for impl in impls}
    threads[f"eager x{tp}"] = threads[f"tp_auto x{tp}"] = tp
    on_rank0 = {"eager x1", f"eager x{tp}", "tp_auto x1", f"tp_auto x{tp}"}
    solo_models = {"tp_auto x1", f"tp_auto x{tp}"}

    gen = torch.Generator().manual_seed(0)
    ids = {s: torch.randint(0, cfg.vocab_size, (1, s), generator=gen) for s in SEQS}
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen)

    def workloads(model):
        def prefill(s):
            return lambda: model(input_ids=ids[s], logits_to_keep=1)

        def generate(n):
            return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False)
        return {**{f"prefill {s}": prefill(s) for s in SEQS},
                "full 512": lambda: model(input_ids=ids[512], use_cache=False),
                "decode 1": generate(1), f"decode {NEW_TOKENS}": generate(NEW_TOKENS)}

    times = {impl: {} for impl in impls}
    with torch.no_grad():
        for rnd in range(-1, args.rounds):  # round -1 warms up (compiles every graph)
            # Each round starts one row later than the last, so no row always runs first,
            # last or right after the same row (the same order on every rank).
            k = max(rnd, 0) % len(impls)
            for impl in impls[k:] + impls[:k]:
                only0 = impl in on_rank0 and not (rnd < 0 and impl in solo_models)
                torch.set_num_threads(threads[impl])
                for name, fn in workloads(models.get(impl)).items():
                    reps = 2 if rnd < 0 else 1
                    for _ in range(reps):
                        t = _timed(fn, rank, only0)
                    if rnd >= 0 and t is not None:
                        times[impl].setdefault(name, []).append(t)
                torch.set_num_threads(1)
            if rank == 0:
                print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    if rank == 0:
        report(args, tp, times)
    dist.destroy_process_group()


def report(args, tp: int, times: dict) -> None:
    decode = f"decode {NEW_TOKENS}"
    impls = list(times)
    for impl in impls:  # decode seconds per new token, prefill excluded, per round
        t = times[impl]
        t["decode per token"] = [(a - b) / (NEW_TOKENS - 1) for a, b in zip(t[decode], t["decode 1"])]
    work = [f"prefill {s}" for s in SEQS] + ["full 512", "decode per token"]
    res = {"model": args.model, "tp": tp, "rounds": args.rounds, "threads_per_rank": 1,
           "times_s": times, "summary": {}}
    print(f"\n{args.model}, TP={tp}, {args.rounds} alternating rounds, 1 thread per TP rank "
          f"(eager x{tp}: 1 process, {tp} threads). Ratios are medians over rounds of "
          "per-round ratios (timings taken moments apart); 'vs eager x1' = eager x1 time / time; "
          "'vs x1 same kernels' = parallel efficiency x N (tp_auto against tp_auto x1, "
          "tp_auto/aten, hf_tp and ds_autotp against eager x1); 'vs hf_tp' = hf_tp time / "
          "time; 'vs ds_autotp' = ds_autotp time / time (issue 21's target: >= 1.11x); "
          f"'vs 1 proc x{tp}' = tp_auto x{tp} time / time (one process on the same cores, "
          "same kernels: above 1 where TP pays on this machine).")
    print(f"{'workload':16s} {'impl':12s} {'median':>9s} {'min':>9s} {'vs eager x1':>11s} "
          f"{'range':>11s} {'vs x1 same kernels':>18s} {'vs hf_tp':>18s} {'vs ds_autotp':>18s} "
          f"{f'vs 1 proc x{tp}':>18s}")

    def ratio(num: list, den: list) -> tuple:
        r = [a / b for a, b in zip(num, den)]
        return statistics.median(r), [min(r), max(r)]

    same_kernel_base = {"tp_auto": "tp_auto x1", "tp_auto/gloo": "tp_auto x1",
                        "tp_auto/head": "tp_auto x1",
                        "tp_auto/aten": "eager x1", "hf_tp": "eager x1", "ds_autotp": "eager x1"}
    for w in work:
        for impl in impls:
            ts = times[impl][w]
            row = {"median_s": statistics.median(ts), "min_s": min(ts)}
            row["speedup_vs_eager_x1"], row["speedup_range"] = ratio(times["eager x1"][w], ts)
            cols = ["", "", "", ""]
            if impl in same_kernel_base and same_kernel_base[impl] in times:
                row["speedup_same_kernels"], rng = ratio(times[same_kernel_base[impl]][w], ts)
                cols[0] = f"{row['speedup_same_kernels']:.2f}x ({rng[0]:.2f}-{rng[1]:.2f})"
            if impl in ("tp_auto", "tp_auto/gloo", "tp_auto/head", "tp_auto/aten",
                        "ds_autotp") and "hf_tp" in times:
                row["vs_hf_tp"], row["vs_hf_tp_range"] = ratio(times["hf_tp"][w], ts)
                rng = row["vs_hf_tp_range"]
                cols[1] = f"{row['vs_hf_tp']:.2f}x ({rng[0]:.2f}-{rng[1]:.2f})"
            if impl.startswith("tp_auto") and impl != "tp_auto x1" and "ds_autotp" in times:
                row["vs_ds_autotp"], row["vs_ds_autotp_range"] = ratio(times["ds_autotp"][w], ts)
                rng = row["vs_ds_autotp_range"]
                cols[2] = f"{row['vs_ds_autotp']:.2f}x ({rng[0]:.2f}-{rng[1]:.2f})"
            if impl in ("tp_auto", "tp_auto/gloo", "tp_auto/head", "tp_auto/aten", "hf_tp",
                        "ds_autotp") and f"tp_auto x{tp}" in times:
                row["vs_one_process"], rng = ratio(times[f"tp_auto x{tp}"][w], ts)
                cols[3] = f"{row['vs_one_process']:.2f}x ({rng[0]:.2f}-{rng[1]:.2f})"
            res["summary"].setdefault(w, {})[impl] = row
            lo, hi = row["speedup_range"]
            print(f"{w:16s} {impl:12s} {1e3 * row['median_s']:7.1f}ms "
                  f"{1e3 * row['min_s']:7.1f}ms {row['speedup_vs_eager_x1']:10.2f}x "
                  f"{lo:5.2f}-{hi:<5.2f} {cols[0]:>18s} {cols[1]:>18s} {cols[2]:>18s} {cols[3]:>18s}")
    out = args.out or os.path.join(HERE, "results", f"paired-{args.model}-tp{tp}.json")
    write_json(res, out)
    print_result(res["summary"])


if __name__ == "__main__":
    main()
