"""Cost of the ranks-agree checks (issue 14): a greedy decode step of a random Llama under
``tp_auto`` with ``check_inputs`` / ``sync_rng`` at ``"off"`` and ``"always"`` (one
all-gather of checksums / one broadcast of the random state per call), in interleaved
rounds of one torchrun job. ``"first"``, the default, pays this once per compiled graph.

    python benchmarks/agree_cost.py [--tp 2] [--rounds 5] [--tokens 32]

Prints a table (ms per decode step, median over rounds; the difference is the cost per
call) and writes benchmarks/results/agree-cost-tp2.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import print_result, run_child, write_json  # noqa: E402

MODES = {"off": {"check_inputs": "off", "sync_rng": "off"},
         "check_inputs=always": {"check_inputs": "always", "sync_rng": "off"},
         "sync_rng=always": {"check_inputs": "off", "sync_rng": "always"}}


def child(args):
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=8000)
    models = {}
    for name, opts in MODES.items():
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).eval()
        m.forward = torch.compile(m.forward, backend="tp_auto", options=opts)
        models[name] = m
    torch._dynamo.config.cache_size_limit = 64
    ids = torch.randint(0, 8000, (1, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    for m in models.values():  # compile every graph
        m.generate(ids, **kw)
    times = {name: [] for name in MODES}
    for _ in range(args.rounds):
        for name, m in models.items():
            dist.barrier()
            t0 = time.perf_counter()
            m.generate(ids, **kw)
            times[name].append((time.perf_counter() - t0) / args.tokens * 1e3)
    if rank == 0:
        print_result(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args)
    times = run_child(__file__, ["--child", "--rounds", str(args.rounds), "--tokens",
                                 str(args.tokens)], tp=args.tp)
    if "error" in times:
        print("failed:", times["error"])
        return
    base = statistics.median(times["off"])
    print(f"TP={args.tp}, ms per decode step (median of {args.rounds} rounds, "
          f"{args.tokens} tokens each)")
    print(f"{'mode':22s} {'ms/step':>8s} {'cost/call ms':>13s}")
    summary = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        summary[name] = {"ms_per_step": med, "cost_per_call_ms": med - base, "rounds": ts}
        print(f"{name:22s} {med:8.2f} {med - base:13.2f}")
    write_json({"tp": args.tp, "modes": summary},
               os.path.join(HERE, "results", f"agree-cost-tp{args.tp}.json"))


if __name__ == "__main__":
    main()
