"""Inference benchmark: prefill latency, decode tokens/s, first-call compile time, memory
and communication, single process vs ``tp_auto`` vs transformers' ``tp_plan="auto"``.

    python benchmarks/forward.py [--model llama smollm2] [--out benchmarks/results/forward.json]

Each configuration runs in its own child process (TP ones under torchrun), one after another,
with a fresh Inductor cache (so "first call" is a cold compile everywhere). Models:

* ``llama`` -- a random Llama of 258M parameters (fp32): hidden 1536, 24 heads, 12 KV
  heads, intermediate 4224, vocab 32064 (Phi-3's), 6 layers, untied. Every split dim
  divides 2, 3 and 4, so TP=2 and TP=3 both run on it.
* ``smollm2`` -- SmolLM2-135M-Instruct (9 heads, 3 KV heads: TP=3 splits them evenly, TP=2
  5 + 4 with the KV heads whole; transformers refuses TP=2 there).

Measured per configuration:

* ``prefill S`` -- the forward ``generate`` runs on a prompt of S tokens: KV cache on,
  logits of the last position only (``logits_to_keep=1``); median of 3 after warm-up;
* ``fwd512 all`` -- a plain forward at S=512 returning all logits (``use_cache=False``):
  under TP this adds the all-gather of the ``[1, 512, V]`` logits;
* ``decode`` -- tokens/s of greedy ``generate`` (32 new tokens after a 32-token prompt),
  prefill time excluded;
* ``1st out`` -- seconds from the start (load included) to the first prefill's output;
  ``parallelize_model`` reads no weight (the first call solves the plan and reads them),
  so for ``tp_auto`` it also gives the split of that first call: decomposition, solve,
  rewrite, downstream (Inductor) compile, summed over the graphs compiled until then;
* parameter MiB per rank, peak RSS per rank (max over ranks);
* collectives in one prefill-512 forward (``torch.profiler``, for ``tp_auto`` and
  transformers alike) and, where the profiler shows their shapes, their payload bytes per
  token; the Megatron minimum is 2 all-reduces of ``B*S*E`` per layer.

Rows: ``tp_auto`` uses the defaults (Inductor, fp32 matmuls on oneDNN: see
``tp_backend/cpu_matmul.py``); ``tp_auto/aten`` computes matmuls with ATen's kernel (MKL),
as eager, Inductor and transformers do, so it isolates the split from the kernel choice;
``tp_auto/eager`` runs the rewritten graph without Inductor; ``tp_auto/head`` keeps the LM
head whole on every rank (``lm_head="replicate"``: no logits all-gather, as DeepSpeed AutoTP
does); ``tp_auto/balance`` evens out the ranks' work (``balance="work"``: a weighted MLP
split, queries in whole KV groups; SmolLM2 at TP=2). ``tp_auto TP=1 x2`` is one
process on both cores with ``tp_auto``'s kernels: what a user with one CPU would run
instead of tensor parallelism. ``ds_autotp`` is DeepSpeed AutoTP
(``deepspeed.init_inference``; skipped with a note where deepspeed is not installed).

Threads: torchrun gives each rank 1 thread. The speed-up column compares with one process
on 1 thread (Megatron's one-device -> N-devices comparison); ``eager x2`` is one process
on the same 2 cores that TP=2 uses. This machine has 2 cores, so TP=3 (3 threads)
oversubscribes it: those rows show correctness and overhead under load, not speed-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from _common import deepspeed_autotp, print_result, run_child, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA = dict(hidden_size=1536, intermediate_size=4224, num_attention_heads=24,
             num_key_value_heads=12, num_hidden_layers=6, vocab_size=32064,
             max_position_embeddings=2048, tie_word_embeddings=False)
SEQS = (128, 512)
NEW_TOKENS = 32
# (row name, implementation, threads per rank, ranks)
CONFIGS = {
    "llama": [("eager x1", "eager", 1, 1), ("eager x2", "eager", 2, 1),
              ("inductor x1", "inductor", 1, 1), ("inductor x2", "inductor", 2, 1),
              ("tp_auto TP=1", "tp_auto", 1, 1), ("tp_auto TP=1 x2", "tp_auto", 2, 1),
              ("tp_auto TP=2", "tp_auto", 1, 2), ("tp_auto/aten TP=2", "tp_auto_aten", 1, 2),
              ("tp_auto/eager TP=2", "tp_auto_eager", 1, 2),
              ("tp_auto/head TP=2", "tp_auto_head", 1, 2),
              ("hf_tp TP=2", "hf_tp", 1, 2), ("ds_autotp TP=2", "ds_autotp", 1, 2),
              ("tp_auto TP=3", "tp_auto", 1, 3), ("hf_tp TP=3", "hf_tp", 1, 3)],
    "smollm2": [("eager x1", "eager", 1, 1), ("eager x2", "eager", 2, 1),
                ("inductor x1", "inductor", 1, 1), ("tp_auto TP=1 x2", "tp_auto", 2, 1),
                ("tp_auto TP=2", "tp_auto", 1, 2), ("tp_auto/head TP=2", "tp_auto_head", 1, 2),
                ("tp_auto/balance TP=2", "tp_auto_balance", 1, 2), ("ds_autotp TP=2", "ds_autotp", 1, 2),
                ("tp_auto TP=3", "tp_auto", 1, 3), ("hf_tp TP=3", "hf_tp", 1, 3)],
}


def checkpoint(model: str) -> str:
    from tp_backend.models import cache_root, smollm2_checkpoint

    if model == "smollm2":
        return smollm2_checkpoint()
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(cache_root(), "bench-llama-258m")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def _median_time(fn, reps=3, warmups=1):
    for _ in range(warmups):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _count_collectives(fn, tokens: int) -> dict:
    """Collectives one call of ``fn`` runs (``c10d::`` events of ``torch.profiler``, plus
    the shared-memory all-reduces of ``tp_auto`` and DeepSpeed and ``tp_auto``'s
    shared-memory all-gathers, which bypass c10d) and
    their payload bytes per token (fp32: the tensor each rank contributes). The profiler
    records no shapes for ``c10d::allreduce_``'s tensor list, so bytes are read from the
    functional collective that issued it (``_c10d_functional::``: all of ``tp_auto``'s
    gloo ones) or from the shared-memory op; ``None`` if some collective was issued
    otherwise (transformers calls ``dist.all_reduce`` directly)."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    events = prof.events()
    # tp_backend's op calls DeepSpeed's: count DeepSpeed's only where it was called directly.
    ours = any(ev.name == "tp_backend::shm_all_reduce" for ev in events)
    shm_ops = (("tp_backend::shm_all_reduce",) if ours else
               ("deepspeed::inference_all_reduce", "deepspeed::inference_all_reduce_"))
    counts, nbytes, sized = {}, 0, 0
    for ev in events:
        if ev.name.startswith("c10d::") and "barrier" not in ev.name:
            kind = ev.name[len("c10d::"):].strip("_")
            counts[kind] = counts.get(kind, 0) + 1
            continue
        if ev.name in shm_ops:
            counts["allreduce"] = counts.get("allreduce", 0) + 1
        elif ev.name == "tp_backend::shm_all_gather":  # the logits, through the same kernel
            counts["allgather"] = counts.get("allgather", 0) + 1
        elif not (ev.name.startswith("_c10d_functional::") and "wait" not in ev.name):
            continue
        sized += 1
        n = 1
        for d in (ev.input_shapes[0] if ev.input_shapes else []):
            n *= d
        nbytes += 4 * n
    return {"collectives": counts, "collective_bytes_per_token":
            nbytes / tokens if sized == sum(counts.values()) else None}


def run_one(model_name: str, impl: str, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoConfig

    torch.set_num_threads(threads)
    path = checkpoint(model_name)
    cfg = AutoConfig.from_pretrained(path)
    res = {"impl": impl, "threads_per_rank": threads}
    rank, tp = 0, 1
    t0 = time.perf_counter()
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

            compiler = "eager" if impl == "tp_auto_eager" else "inductor"
            kernel = "aten" if impl == "tp_auto_aten" else "onednn"
            head = "replicate" if impl == "tp_auto_head" else "split"
            balance = "work" if impl == "tp_auto_balance" else "off"
            model = tp_backend.parallelize_model(path, compiler=compiler, cpu_matmul=kernel,
                                                 lm_head=head, balance=balance)
        elif impl == "ds_autotp":
            model, why = deepspeed_autotp(path, tp)
            if model is None:
                dist.destroy_process_group()
                return {"skipped": why} if rank == 0 else {}
        else:
            model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    res["load_s"] = time.perf_counter() - t0
    res["tp"] = tp
    gen = torch.Generator().manual_seed(0)
    ids = {s: torch.randint(0, cfg.vocab_size, (1, s), generator=gen) for s in SEQS}
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen)
    n_plans = 0
    with torch.no_grad():
        for s in SEQS:
            def prefill(s=s):
                model(input_ids=ids[s], logits_to_keep=1)

            t0 = time.perf_counter()
            prefill()
            res[f"first_call_s_{s}"] = time.perf_counter() - t0
            if s == SEQS[0]:
                res["time_to_first_prefill_s"] = res["load_s"] + res[f"first_call_s_{s}"]
            if impl.startswith("tp_auto") and s == SEQS[0]:
                import tp_backend

                plans = tp_backend.tp_auto.plans
                n_plans = len(plans)
                split = {}
                for p in plans:
                    for k, v in p.timings.items():
                        split[k] = split.get(k, 0.0) + v
                res["first_call_split_s"] = {k: round(v, 3) for k, v in split.items()}
            res[f"prefill_ms_{s}"] = 1e3 * _median_time(prefill, reps=5, warmups=2)
        full = lambda: model(input_ids=ids[512], use_cache=False)  # noqa: E731
        res["fwd512_all_logits_ms"] = 1e3 * _median_time(full)

        def generate(n):
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        generate(4)  # compile the decode graphs (a compiled decode settles once shapes go dynamic)
        generate(4)
        t_one = _median_time(lambda: generate(1), reps=3, warmups=0)
        t_all = _median_time(lambda: generate(NEW_TOKENS), reps=3, warmups=0)
        res["decode_tok_s"] = (NEW_TOKENS - 1) / max(t_all - t_one, 1e-9)
        if tp > 1:
            res.update(_count_collectives(lambda: model(input_ids=ids[512], logits_to_keep=1), 512))
    res["megatron_min_all_reduces"] = 2 * cfg.num_hidden_layers
    res["megatron_min_bytes_per_token"] = 2 * cfg.num_hidden_layers * cfg.hidden_size * 4
    if impl.startswith("tp_auto"):
        import tp_backend

        res["param_mib_per_rank"] = tp_backend.local_parameter_bytes(model) / 2**20
        res["stats"] = dict(tp_backend.tp_auto.stats)
        res["graphs_in_first_call"] = n_plans
    else:
        local = [getattr(p, "_local_tensor", p) for p in model.parameters()]  # DTensor: local
        res["param_mib_per_rank"] = sum(t.numel() * t.element_size() for t in local) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if impl not in ("eager", "inductor"):
        import torch.distributed as dist

        all_rss = [None] * tp
        dist.all_gather_object(all_rss, rss)
        rss = max(all_rss)
        dist.destroy_process_group()
    res["peak_rss_mib_per_rank"] = rss
    return res if rank == 0 else {}


def _fmt(v, width: int, prec: int = 2) -> str:
    return f"{v:{width}.{prec}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def print_table(model: str, rows: dict) -> None:
    base1 = rows.get("eager x1", {}).get("prefill_ms_512")
    base2 = rows.get("eager x2", {}).get("prefill_ms_512")
    print(f"\n{model}: prefill = KV cache + last-token logits (what generate runs); "
          "speed-ups are prefill-512 vs one process")
    head = (f"{'config':20s} {'TP':>2s} {'thr':>3s} {'prefill128':>10s} {'prefill512':>10s} "
            f"{'vs x1':>5s} {'vs x2':>5s} {'fwd512 all':>10s} {'decode':>6s} {'1st out':>8s} "
            f"{'MiB/rank':>8s} {'RSS MiB':>7s} {'coll/fwd':>8s} {'B/token':>8s}")
    print(head)
    print(f"{'':20s} {'':2s} {'':3s} {'ms':>10s} {'ms':>10s} {'':5s} {'':5s} {'ms':>10s} "
          f"{'tok/s':>6s} {'s':>8s}")
    for name, r in rows.items():
        if "error" in r or "skipped" in r:
            print(f"{name:20s} {'error' if 'error' in r else 'skipped'}: "
                  f"{r.get('error') or r.get('skipped')}")
            continue
        p512 = r["prefill_ms_512"]
        coll = sum(r["collectives"].values()) if "collectives" in r else "-"
        print(f"{name:20s} {r['tp']:2d} {r['threads_per_rank']:3d} {r['prefill_ms_128']:10.1f} "
              f"{p512:10.1f} {_fmt(base1 / p512 if base1 else None, 5)} "
              f"{_fmt(base2 / p512 if base2 else None, 5)} {r['fwd512_all_logits_ms']:10.1f} "
              f"{r['decode_tok_s']:6.1f} {r['time_to_first_prefill_s']:8.1f} {r['param_mib_per_rank']:8.1f} "
              f"{r['peak_rss_mib_per_rank']:7.0f} {str(coll):>8s} "
              f"{_fmt(r.get('collective_bytes_per_token'), 8, 0)}")
    any_row = next((r for r in rows.values() if "megatron_min_all_reduces" in r), None)
    if any_row:
        print(f"Megatron minimum per forward: {any_row['megatron_min_all_reduces']} all-reduces, "
              f"{any_row['megatron_min_bytes_per_token']} B/token (fp32)")
    for name, r in rows.items():
        if "collectives" in r:
            print(f"  {name}: collectives {r['collectives']}")
        if "first_call_split_s" in r:
            print(f"  {name}: first output after {r['time_to_first_prefill_s']:.1f} s, "
                  f"{r['graphs_in_first_call']} graph(s) compiled: {r['first_call_split_s']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["llama", "smollm2"], choices=sorted(CONFIGS))
    ap.add_argument("--only", nargs="+", default=None, metavar="ROW",
                    help="run only these rows (names as in the table, e.g. 'eager x1' 'tp_auto TP=2')")
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "forward.json"))
    args = ap.parse_args()
    if args.impl:  # a child run
        res = run_one(args.model[0], args.impl, args.threads)
        if res:
            print_result(res)
        return
    results = {}
    for model in args.model:
        checkpoint(model)
        rows = results[model] = {}
        for name, impl, threads, tp in CONFIGS[model]:
            if args.only and name not in args.only:
                continue
            rows[name] = run_child(__file__, ["--model", model, "--impl", impl,
                                              "--threads", str(threads)], tp, fresh_inductor_cache=True,
                                   torchrun=impl not in ("eager", "inductor"))
            print(f"{model} / {name} done", flush=True)
        print_table(model, rows)
    write_json(results, args.out)


if __name__ == "__main__":
    main()
