"""GPU benchmark: ``tp_auto`` against eager and plain ``torch.compile`` on one CUDA device,
in bf16 (issue 17, item 8).

    python benchmarks/gpu.py [--rows eager inductor "tp_auto TP=1"] [--out benchmarks/results/gpu.json]

Model: the random Llama of ``benchmarks/forward.py`` (258M parameters: hidden 1536, 24
heads, 12 KV heads, 6 layers, vocab 32064), loaded in bfloat16. Each row runs in its own
child process, one after another:

* ``eager`` -- transformers' model on the GPU;
* ``inductor`` -- the same, ``model.compile()`` (Inductor's default mode);
* ``tp_auto TP=1`` -- ``tp_backend.parallelize_model`` under torchrun with one NCCL rank
  (the weights read straight to the GPU; the local graph compiled by Inductor);
* ``tp_auto TP=1 gloo`` -- the same with a gloo group (the path the CUDA tests take);
* ``tp_auto TP=2 gloo`` -- two ranks on the *same* GPU through gloo (NCCL refuses two
  ranks on one device): exactness and overhead only, its times say nothing about speed-up
  (the ranks share one GPU and every collective goes through host memory);
* ``inductor reduce-overhead`` and ``tp_auto TP=1 reduce-overhead`` -- ``inductor`` and
  ``tp_auto TP=1`` with ``mode="reduce-overhead"`` (CUDA graphs), decoding with
  transformers' static cache (a dynamic cache has a new shape on every token, so a new
  CUDA graph each).

Measured per row: ``prefill S`` (``generate``'s forward: KV cache on, last-token logits)
at S = 512 and 2048, median of 5 after warm-up, CUDA-synchronised; ``fwd512 all`` (all
logits, no cache); ``decode`` tokens/s of greedy ``generate`` (32 new tokens after a 32-token
prompt, prefill excluded); ``1st out`` (load to first prefill output, compile included);
peak GPU memory (``torch.cuda.max_memory_allocated``, rank 0); and, against the eager row,
the max |difference| of the last-position logits of one 512-token prompt and whether the 32
greedy tokens are the same (bf16: kernels that fuse or order reductions differently round
differently, so small logit differences and, rarely, a different greedy token are expected
between any two of these rows, eager and Inductor included).

Without a CUDA device it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import print_result, run_child, write_json  # noqa: E402
from forward import checkpoint  # noqa: E402

SEQS = (512, 2048)
NEW_TOKENS = 32
ROWS = [("eager", "eager", 1), ("inductor", "inductor", 1), ("tp_auto TP=1", "tp_auto", 1),
        ("tp_auto TP=1 gloo", "tp_auto_gloo", 1), ("tp_auto TP=2 gloo", "tp_auto_gloo", 2),
        # CUDA graphs (mode="reduce-overhead"), decoding with transformers' static cache
        # (a dynamic one has a new shape every token: a new CUDA graph each)
        ("inductor reduce-overhead", "inductor_cudagraphs", 1),
        ("tp_auto TP=1 reduce-overhead", "tp_auto_cudagraphs", 1)]


def _timed(fn, reps=5, warmups=2) -> float:
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_one(impl: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = checkpoint("llama")
    cfg = AutoConfig.from_pretrained(path)
    rank = 0
    t0 = time.perf_counter()
    cudagraphs = impl.endswith("_cudagraphs")
    impl = impl.removesuffix("_cudagraphs")
    mode = {"mode": "reduce-overhead"} if cudagraphs else {}
    if impl in ("eager", "inductor"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        if impl == "inductor":
            model.compile(**mode)
    else:
        import torch.distributed as dist

        import tp_backend

        # Two gloo ranks share device 0; NCCL ranks take one device each.
        torch.cuda.set_device(0 if impl == "tp_auto_gloo" else int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if impl == "tp_auto" else "gloo")
        rank = dist.get_rank()
        model = tp_backend.parallelize_model(path, dtype=torch.bfloat16,
                                             device=torch.device("cuda", torch.cuda.current_device()),
                                             **mode)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = {s: torch.randint(0, cfg.vocab_size, (1, s), generator=gen).to(device) for s in SEQS}
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen).to(device)
    res = {"impl": impl, "device": torch.cuda.get_device_name(device), "cudagraphs": cudagraphs}
    with torch.no_grad():
        model(input_ids=ids[SEQS[0]], logits_to_keep=1)
        torch.cuda.synchronize()
        res["first_out_s"] = time.perf_counter() - t0
        for s in SEQS:
            res[f"prefill_ms_{s}"] = 1e3 * _timed(lambda s=s: model(input_ids=ids[s],
                                                                    logits_to_keep=1))
        full = lambda: model(input_ids=ids[512], use_cache=False).logits  # noqa: E731
        res["fwd512_all_logits_ms"] = 1e3 * _timed(full)
        res["last_logits"] = full()[0, -1].float().cpu().tolist()

        def generate(n):
            static = {"cache_implementation": "static"} if cudagraphs else {}
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  **static)

        generate(4)
        generate(4)
        t_one = _timed(lambda: generate(1), reps=3, warmups=0)
        t_all = _timed(lambda: generate(NEW_TOKENS), reps=3, warmups=0)
        res["decode_tok_s"] = (NEW_TOKENS - 1) / max(t_all - t_one, 1e-9)
        res["tokens"] = generate(NEW_TOKENS)[0, prompt.shape[1]:].tolist()
    res["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if impl.startswith("tp_auto"):
        import torch.distributed as dist

        import tp_backend

        res["param_mib_per_rank"] = tp_backend.local_parameter_bytes(model) / 2**20
        dist.destroy_process_group()
    return res if rank == 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu.json"))
    parser.add_argument("--rows", nargs="+", default=[name for name, _, _ in ROWS],
                        help="which rows to run (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(run_one(args.child))
        return
    if not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; nothing measured")
        return
    checkpoint("llama")  # written once, before the rows race to write it
    rows = {}
    for name, impl, ranks in ROWS:
        if name not in args.rows:
            continue
        rows[name] = run_child(__file__, ["--child", impl], tp=ranks,
                               torchrun=impl.startswith("tp_auto"))
        print(f"{name}: done", {k: v for k, v in rows[name].items()
                                if k not in ("last_logits", "tokens", "stderr_tail")}, flush=True)
        if "stderr_tail" in rows[name]:
            print(rows[name]["stderr_tail"], flush=True)
    ref = rows.get("eager", {})
    for r in rows.values():
        if "last_logits" in r and "last_logits" in ref:
            r["max_logit_diff_vs_eager"] = max(abs(a - b) for a, b in
                                               zip(r["last_logits"], ref["last_logits"]))
            r["tokens_equal_eager"] = r["tokens"] == ref["tokens"]
    device = next((r["device"] for r in rows.values() if "device" in r), "?")
    print(f"\n{device}, torch {torch.__version__}, bf16, random Llama 258M")
    print(f"{'row':20s} {'prefill512':>10s} {'prefill2048':>11s} {'fwd512 all':>10s} "
          f"{'decode':>7s} {'1st out':>7s} {'GPU MiB':>7s} {'|dlogit|':>8s} {'tokens':>6s}")
    print(f"{'':20s} {'ms':>10s} {'ms':>11s} {'ms':>10s} {'tok/s':>7s} {'s':>7s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:20s} error: {r['error']}")
            continue
        print(f"{name:20s} {r['prefill_ms_512']:10.2f} {r['prefill_ms_2048']:11.2f} "
              f"{r['fwd512_all_logits_ms']:10.2f} {r['decode_tok_s']:7.1f} "
              f"{r['first_out_s']:7.1f} {r['peak_gpu_mib']:7.0f} "
              f"{r.get('max_logit_diff_vs_eager', float('nan')):8.3g} "
              f"{'same' if r.get('tokens_equal_eager') else 'differ':>6s}")
    for r in rows.values():
        r.pop("last_logits", None)
    write_json(rows, args.out)


if __name__ == "__main__":
    main()
