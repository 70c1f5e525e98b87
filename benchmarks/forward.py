"""Forward benchmark: prefill latency, decode tokens/s, compile time, memory and
communication of a random ~160M-parameter Llama under tensor parallelism.

    python benchmarks/forward.py [--out benchmarks/results/forward.json]

The model: hidden 1024, 16 heads, 8 KV heads (both divide 2 and 4), 8 layers,
intermediate 2816, vocab 32000, untied (157M parameters, fp32), saved once as a checkpoint.
Configurations, run one after another in one invocation:

* ``eager x1`` / ``eager x2`` -- one process, 1 or 2 threads;
* ``inductor x2``           -- one process, ``torch.compile`` (Inductor), 2 threads;
* ``tp_auto``               -- TP=2 under torchrun, 1 thread per rank, ``parallelize_model``
  with the rewritten graph run eagerly;
* ``tp_auto+inductor``      -- the same, each rank's graph compiled by Inductor;
* ``hf_tp``                 -- TP=2, transformers' ``from_pretrained(tp_plan="auto")``.

So every TP=2 row uses the same 2 cores as ``eager x2``; ``eager x1`` is the one-thread
baseline the TP=2 speed-up is measured against (the Megatron comparison: one device ->
two devices). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from _common import run_child, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
              num_key_value_heads=8, num_hidden_layers=8, vocab_size=32000,
              max_position_embeddings=2048, tie_word_embeddings=False)
SEQS = (128, 512)


def checkpoint() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tp_backend.models import cache_root

    path = os.path.join(cache_root(), "bench-llama-157m")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
    return path


def _time(fn, reps=3, warmups=1):
    for _ in range(warmups):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_one(impl: str, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = checkpoint()
    res = {"impl": impl, "threads_per_rank": threads}
    t0 = time.perf_counter()
    rank, tp = 0, 1
    if impl in ("eager", "inductor"):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        if impl == "inductor":
            model.compile()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, tp = dist.get_rank(), dist.get_world_size()
        if impl.startswith("tp_auto"):
            import tp_backend

            compiler = "inductor" if impl.endswith("inductor") else "eager"
            model = tp_backend.parallelize_model(path, compiler=compiler)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    res["load_s"] = time.perf_counter() - t0
    res["tp"] = tp
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for seq in SEQS:
            ids = torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=gen)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            res[f"first_call_s_{seq}"] = time.perf_counter() - t0
            res[f"prefill_ms_{seq}"] = 1e3 * _time(lambda: model(input_ids=ids, use_cache=False))
        prompt = torch.randint(0, CONFIG["vocab_size"], (1, 32), generator=gen)

        def decode():
            model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)

        # Two warm-ups: a compiled decode settles after its shapes go dynamic.
        res["decode_tok_s"] = 16 / _time(decode, reps=2, warmups=2)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if impl.startswith("tp_auto"):
        import tp_backend

        plans = [p for p in tp_backend.tp_auto.plans if p.num_nodes]
        plan = max(plans, key=lambda p: p.num_nodes)
        local, full = plan.param_bytes()
        res["param_mib_per_rank"] = local / 2**20
        res["param_mib_full"] = full / 2**20
        res["all_reduce_per_forward"] = sum(plan.collectives_per_layer("all_reduce").values())
        res["all_gather_per_forward"] = sum(plan.collectives_per_layer("all_gather").values())
        res["pass_s"] = {k: round(v, 3) for k, v in plan.timings.items()}
        res["stats"] = dict(tp_backend.tp_auto.stats)
        # Megatron minimum: 2 all-reduces of B*S*E per layer (fp32); bytes per token.
        per_tok_min = 2 * CONFIG["num_hidden_layers"] * CONFIG["hidden_size"] * 4
        res["megatron_min_bytes_per_token"] = per_tok_min
    else:
        local = [getattr(p, "_local_tensor", p) for p in model.parameters()]  # DTensor: local
        res["param_mib_per_rank"] = sum(t.numel() * t.element_size() for t in local) / 2**20
    if tp > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return res if rank == 0 else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "forward.json"))
    args = ap.parse_args()
    if args.impl:
        res = run_one(args.impl, args.threads)
        if res:
            print("RESULT " + json.dumps(res))
        return
    checkpoint()
    configs = [("eager x1", "eager", 1, 1), ("eager x2", "eager", 2, 1),
               ("inductor x2", "inductor", 2, 1), ("tp_auto", "tp_auto", 1, 2),
               ("tp_auto+inductor", "tp_auto+inductor", 1, 2), ("hf_tp", "hf_tp", 1, 2)]
    rows = {}
    for name, impl, threads, tp in configs:
        rows[name] = run_child(__file__, ["--impl", impl, "--threads", str(threads)], tp)
        print(name, "done", flush=True)
    base = rows["eager x1"]
    print(f"\n{'config':18s} {'TP':>2s} {'thr':>3s} {'prefill128 ms':>13s} {'prefill512 ms':>13s} "
          f"{'speedup512 vs x1':>16s} {'decode tok/s':>12s} {'1st call s':>10s} {'param MiB/rank':>14s} "
          f"{'peak RSS MiB':>12s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:18s} error: {r['error']}")
            continue
        print(f"{name:18s} {r['tp']:2d} {r['threads_per_rank']:3d} {r['prefill_ms_128']:13.1f} "
              f"{r['prefill_ms_512']:13.1f} {base['prefill_ms_512'] / r['prefill_ms_512']:16.2f} "
              f"{r['decode_tok_s']:12.2f} {r['first_call_s_128']:10.1f} {r['param_mib_per_rank']:14.1f} "
              f"{r['peak_rss_mib']:12.0f}")
    for name in ("tp_auto", "tp_auto+inductor"):
        r = rows.get(name, {})
        if "pass_s" in r:
            print(f"{name}: passes {r['pass_s']}, all-reduces/forward {r['all_reduce_per_forward']} "
                  f"(Megatron minimum {2 * CONFIG['num_hidden_layers']} + 1 embedding), "
                  f"all-gathers {r['all_gather_per_forward']}, stats {r['stats']}")
    write_json(rows, args.out)


if __name__ == "__main__":
    main()
