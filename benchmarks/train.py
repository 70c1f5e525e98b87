"""Training-step speed and memory: one process (eager, ``torch.compile``) against
``tp_auto`` and transformers' ``tp_plan="auto"`` at TP=2.

    python benchmarks/train.py [--model small|llama] [--steps 6] [--batch 4] [--seq 128]
        [--out benchmarks/results/train-small.json]

A step is a forward with ``labels`` (the model's cross-entropy), ``loss.backward()``,
AdamW and ``zero_grad``, on random token ids (the same batch on every rank). Each row runs
in its own process (``_common.run_child``): its peak RSS (``ru_maxrss``, per rank: the
largest rank's) covers exactly that configuration. Reported: the median step time over
``--steps`` steps after two warm-up steps (the first compiles), tokens per second (batch x
sequence / step time), the first step's time, and the ratio of each row's step time to
``eager x1``. Rows:

* ``eager x1`` / ``eager x2`` -- the unsharded model, eager, 1 or 2 threads;
* ``inductor x1`` -- ``torch.compile(model)`` (Inductor), 1 thread;
* ``tp_auto TP=2`` -- ``torch.compile(model, backend="tp_auto")``, 1 thread per rank, the
  stock AdamW over ``model.parameters()`` (sharded ones are ``tp_backend.TPTensor``s);
* ``hf_tp TP=2`` -- ``from_pretrained(path, tp_plan="auto")`` (DTensor parameters), 1 thread
  per rank; skipped with a one-line note where transformers' TP cannot train here.

Models: ``small`` (a random Llama of hidden 512, 4 layers, 8 heads, 4 KV heads, vocab 8000:
about 27M parameters; the default, as Inductor's backward compile on 2 cores takes minutes
for larger ones) and ``llama`` (the 258M-parameter Llama of ``forward.py``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import print_result, run_child, write_json  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=4, num_hidden_layers=4, vocab_size=8000,
             max_position_embeddings=512, tie_word_embeddings=False)
ROWS = [("eager x1", "eager", 1, 1), ("eager x2", "eager", 2, 1),
        ("inductor x1", "inductor", 1, 1), ("tp_auto TP=2", "tp_auto", 1, 2),
        ("hf_tp TP=2", "hf_tp", 1, 2)]


def checkpoint(model: str) -> str:
    if model == "llama":
        from forward import checkpoint as forward_checkpoint

        return forward_checkpoint("llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tp_backend.models import cache_root

    path = os.path.join(cache_root(), "bench-llama-small-train")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(path)
    return path


def run_one(model_name: str, impl: str, threads: int, steps: int, batch: int,
            seq: int) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    path = checkpoint(model_name)
    if impl == "hf_tp":
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    step_fn = model
    if impl == "inductor":
        step_fn = torch.compile(model)
    elif impl == "tp_auto":
        import tp_backend  # noqa: F401  (registers nothing new: the entry point does)

        step_fn = torch.compile(model, backend="tp_auto")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # before compile, as users do
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    if distributed:
        all_rss = [None] * dist.get_world_size()
        dist.all_gather_object(all_rss, rss)
        rss = max(all_rss)
        dist.destroy_process_group()
    step = statistics.median(times[2:])
    return {"step_s": step, "tokens_per_s": batch * seq / step, "first_step_s": times[0],
            "peak_rss_mib": rss, "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", choices=("small", "llama"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, threads = args.child
        try:
            res = run_one(args.model, impl, int(threads), args.steps, args.batch, args.seq)
        except Exception as e:  # noqa: BLE001 - reported as the row's note
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if os.environ.get("RANK", "0") == "0":
            print_result(res)
        return

    checkpoint(args.model)  # created once, before the children read it
    rows = {}
    for name, impl, threads, ranks in ROWS:
        rows[name] = run_child(os.path.abspath(__file__),
                               ["--model", args.model, "--steps", str(args.steps),
                                "--batch", str(args.batch), "--seq", str(args.seq),
                                "--child", impl, str(threads)], tp=ranks)
        print(name, rows[name], flush=True)
    base = rows.get("eager x1", {}).get("step_s")
    print(f"\ntraining step, {args.model}, batch {args.batch} x {args.seq} tokens, AdamW")
    print(f"{'row':<14} {'step (s)':>9} {'tok/s':>8} {'vs eager x1':>11} {'first (s)':>9} "
          f"{'peak RSS/rank (MiB)':>19}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<14} skipped: {r['error']}")
            continue
        ratio = base / r["step_s"] if base else float("nan")
        print(f"{name:<14} {r['step_s']:>9.3f} {r['tokens_per_s']:>8.0f} {ratio:>10.2f}x "
              f"{r['first_step_s']:>9.1f} {r['peak_rss_mib']:>19.0f}")
    write_json(rows, args.out or os.path.join(HERE, "results", f"train-{args.model}.json"))


if __name__ == "__main__":
    main()
