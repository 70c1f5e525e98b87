"""Generation benchmark: prefill latency and decode tokens/s of SmolLM2-135M-Instruct.

    python benchmarks/generation.py            # runs every configuration, one after another

Configurations (same prompt, greedy, 32 new tokens, fp32, in one run):

* ``eager``      -- one process, the transformers model as is;
* ``compile``    -- one process, ``torch.compile`` (Inductor);
* ``tp_auto``    -- TP=3 under torchrun, ``tp_backend.parallelize_model``;
* ``hf_tp``      -- TP=3 under torchrun, transformers' ``from_pretrained(tp_plan="auto")``.

Threads: this machine has 2 cores. The single-process runs use 2 threads; torchrun gives
each of the 3 ranks 1 thread (OMP_NUM_THREADS=1), so TP=3 oversubscribes the cores: the
TP rows measure overhead and correctness under load, not speed-up. Prints a table and
writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _common import run_child, write_json

PROMPT = "What is the capital of France?"
NEW_TOKENS = 32
HERE = os.path.dirname(os.path.abspath(__file__))


def _measure(model, ids):
    def gen(n):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out

    gen(3)  # compile / warm up
    prefill, _ = gen(1)
    total, out = gen(NEW_TOKENS)
    return {"prefill_s": prefill, "decode_tok_s": (NEW_TOKENS - 1) / max(total - prefill, 1e-9),
            "tokens": out[0, ids.shape[1]:].tolist()}


def _prompt_ids(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def run_one(impl: str, path: str) -> dict:
    from transformers import AutoModelForCausalLM

    ids = _prompt_ids(path)
    if impl in ("eager", "compile"):
        torch.set_num_threads(2)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        if impl == "compile":
            model.compile()
        res = _measure(model, ids)
        res.update(tp=1, threads_per_rank=torch.get_num_threads())
        return res
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if impl == "tp_auto":
        import tp_backend

        model = tp_backend.parallelize_model(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    res = _measure(model, ids)
    res.update(tp=dist.get_world_size(), threads_per_rank=torch.get_num_threads())
    if impl == "tp_auto":
        res["stats"] = dict(tp_backend.tp_auto.stats)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return res if rank == 0 else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "generation.json"))
    ap.add_argument("--tp", type=int, default=3)
    args = ap.parse_args()
    from tp_backend.models import smollm2_checkpoint

    path = smollm2_checkpoint()
    if args.impl:  # a child run: print one JSON line
        res = run_one(args.impl, path)
        if res:
            print("RESULT " + json.dumps(res))
        return
    rows = {}
    for impl in ("eager", "compile", "tp_auto", "hf_tp"):
        rows[impl] = run_child(__file__, ["--impl", impl],
                               args.tp if impl in ("tp_auto", "hf_tp") else 1)
    ref = rows["eager"].get("tokens")
    print(f"{'impl':8s} {'TP':>3s} {'thr/rank':>8s} {'prefill ms':>10s} {'decode tok/s':>12s} "
          f"{'tokens = eager':>14s}")
    for impl, r in rows.items():
        if "error" in r:
            print(f"{impl:8s} error: {r['error']}")
            continue
        print(f"{impl:8s} {r['tp']:3d} {r['threads_per_rank']:8d} {1e3 * r['prefill_s']:10.1f} "
              f"{r['decode_tok_s']:12.2f} {str(r['tokens'] == ref):>14s}")
    write_json(rows, args.out)


if __name__ == "__main__":
    main()
