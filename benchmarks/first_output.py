"""Time to the first output, cold and warm: single-process ``torch.compile`` (Inductor)
against ``tp_auto`` at TP=2 and TP=3 (issue 17, item 5: compile once per host).

    python benchmarks/first_output.py [--model llama smollm2] [--rows ...]
        [--out benchmarks/results/first_output.json]

Each row runs twice in its own child processes (TP ones under torchrun): ``cold`` in an
empty ``TORCHINDUCTOR_CACHE_DIR``, then ``warm`` in the same directory (what a user's
second run of the same model gets). "First output" is seconds from the start of loading
(``from_pretrained`` + ``model.compile()``, or ``tp_backend.parallelize_model``) to the
output of the first prefill (a prompt of 128 tokens, last-token logits), as
``forward.py``'s ``1st out``. Also printed: the seconds the first call spent in Inductor
(``tp_auto``: the downstream compile, summed over the graphs, on rank 0 and on the last rank)
and AOTAutograd's cache hits and misses per rank.

Models are ``forward.py``'s (the 258M random Llama, SmolLM2-135M). With 2 cores, TP=3
oversubscribes the machine (3 processes on 2 cores), which is where compiling once per host
saves the most.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from _common import print_result, run_child, write_json
from forward import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = {"inductor x1": ("inductor", 1), "tp_auto TP=2": ("tp_auto", 2),
        "tp_auto TP=3": ("tp_auto", 3)}
PROMPT = 128


def run_one(model_name: str, impl: str) -> dict:
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    path = checkpoint(model_name)
    cfg = AutoConfig.from_pretrained(path)
    rank, tp = 0, 1
    t0 = time.perf_counter()
    if impl == "inductor":
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        model.compile()
    else:
        import torch.distributed as dist

        import tp_backend

        dist.init_process_group("gloo")
        rank, tp = dist.get_rank(), dist.get_world_size()
        model = tp_backend.parallelize_model(path)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t1 = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
    res = {"first_output_s": time.perf_counter() - t0, "load_s": load_s,
           "first_call_s": time.perf_counter() - t1,
           "aot": [dict(counters["aot_autograd"])]}
    if impl == "tp_auto":
        import torch.distributed as dist

        import tp_backend

        inductor = sum(p.timings.get("downstream_compile_s", 0.0) for p in tp_backend.tp_auto.plans)
        everyone = [None] * tp
        dist.all_gather_object(everyone, (inductor, res["aot"][0]))
        res["inductor_s"] = [e[0] for e in everyone]
        res["aot"] = [e[1] for e in everyone]
        dist.destroy_process_group()
    return res if rank == 0 else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["llama", "smollm2"], choices=["llama", "smollm2"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "first_output.json"))
    args = ap.parse_args()
    if args.impl:  # a child run
        res = run_one(args.model[0], args.impl)
        if res:
            print_result(res)
        return
    results = {}
    for model in args.model:
        checkpoint(model)
        rows = results[model] = {}
        for name in args.rows:
            impl, tp = ROWS[name]
            with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
                try:
                    rows[name] = {
                        when: run_child(__file__, ["--model", model, "--impl", impl], tp,
                                        torchrun=impl == "tp_auto")
                        for when in ("cold", "warm")}
                finally:
                    del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            print(f"{model} / {name} done", flush=True)
        print_table(model, rows)
    write_json(results, args.out)


def print_table(model: str, rows: dict) -> None:
    base = {w: rows.get("inductor x1", {}).get(w, {}).get("first_output_s")
            for w in ("cold", "warm")}
    print(f"\n{model}: seconds from the start of loading to the first output (prefill "
          f"{PROMPT}); x = against single-process torch.compile in the same cache state")
    print(f"{'row':14s} {'cache':5s} {'1st out':>8s} {'x':>5s} {'load':>6s} {'1st call':>8s} "
          f"{'Inductor r0/rN':>15s}  AOTAutograd cache per rank")
    for name, by_when in rows.items():
        for when, r in by_when.items():
            if "error" in r:
                print(f"{name:14s} {when:5s} error: {r['error']}")
                continue
            ratio = r["first_output_s"] / base[when] if base[when] else None
            ind = r.get("inductor_s")
            ind_s = f"{ind[0]:.1f} / {ind[-1]:.1f}" if ind else "-"
            aot = ", ".join(f"{a.get('autograd_cache_hit', 0)} hit {a.get('autograd_cache_miss', 0)} miss"
                            for a in r["aot"])
            print(f"{name:14s} {when:5s} {r['first_output_s']:8.1f} "
                  f"{(f'{ratio:5.2f}' if ratio else '    -')} {r['load_s']:6.1f} "
                  f"{r['first_call_s']:8.1f} {ind_s:>15s}  {aot}")


if __name__ == "__main__":
    main()
