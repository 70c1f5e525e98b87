"""Sequence parallelism: memory and time of a training step, and prefill latency, at TP=2
with and without ``options={"sequence_parallel": True}``.

    python benchmarks/sequence_parallel.py [--model llama|small] [--batch 1] [--seq 512]
        [--steps 4] [--prefill 512,2048] [--compiler inductor|eager]
        [--train-compiler inductor|eager] [--out ...json]

Rows, each in its own ``torchrun`` of 2 ranks, 1 thread per rank (``_common.run_child``),
the plain and sequence-parallel rows of each kind back to back:

* ``train`` -- one step (forward with ``labels``, ``loss.backward()``, AdamW, ``zero_grad``)
  on ``--batch`` x ``--seq`` random tokens, the local graphs run by ``--train-compiler``
  (``eager``: autograd through the rewritten ATen graph, op by op, which saves what each op
  saves; ``inductor`` compiles the joint graph, minutes per row on 2 cores). Reported per rank (the largest rank's): the
  median step time after two warm-up steps; the activation bytes the forward saved for
  backward (``torch.autograd.graph.saved_tensors_hooks`` around the compiled call: every
  tensor autograd keeps, counted once by storage, the parameters' own storages left out);
  and the peak RSS of the process
  (``ru_maxrss``, compilation included, as ``train.py`` reports it). (RSS growth within a
  step says nothing here: after the warm-up steps the allocator reuses freed memory.)
* ``prefill S`` -- a full-logits forward under ``no_grad`` on ``[1, S]`` tokens, compiled by
  ``--compiler``: the median of 3 after one warm-up.

Model: ``llama`` is the 258M-parameter Llama of ``forward.py`` (hidden 1536, 6 layers, 24
heads, 12 KV heads, vocab 32064); ``small`` the 27M one of ``train.py``.
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


def _param_storages(model) -> set:
    """Data pointers of the storages of ``model``'s parameters (a sharded one's local
    shard): what autograd saves of them is weights, not activations."""
    out = set()
    for p in model.parameters():
        for t in (p, getattr(p, "to_local", lambda: p)()):
            try:
                out.add(t.untyped_storage().data_ptr())
            except RuntimeError:
                pass
    return out


def _saved_bytes(fn, params: set):
    """``(fn(), bytes of the distinct storages autograd saved for backward during it,
    parameters' storages left out)``."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, AttributeError):  # a fake tensor (while compiling)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def run_one(model_name: str, kind: str, sp: bool, batch: int, seq: int, steps: int,
            compiler: str) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if model_name == "llama":
        from forward import checkpoint
        path = checkpoint("llama")
    else:
        from train import checkpoint
        path = checkpoint("small")
    model = AutoModelForCausalLM.from_pretrained(path)
    options = {"sequence_parallel": sp, "compiler": compiler}
    step_fn = torch.compile(model, backend="tp_auto", options=options)
    vocab = model.config.vocab_size
    res: dict = {}
    if kind == "train":
        model.train()
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times, saved = [], []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            run = lambda: step_fn(input_ids=ids, labels=ids).loss  # noqa: E731
            # (not while the first call compiles: the hooks would see its fake tensors)
            loss, nbytes = (_saved_bytes(run, _param_storages(model)) if i >= 2
                            else (run(), 0))
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
            saved.append(nbytes)
        res = {"step_s": statistics.median(times[2:]), "first_step_s": times[0],
               "saved_mib": statistics.median(saved[2:]) / 2**20,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "loss": loss.item()}
    else:
        s = int(kind.split()[1])
        ids = torch.randint(0, vocab, (1, s), generator=torch.Generator().manual_seed(0))
        model.eval()
        ts = []
        with torch.no_grad():
            for i in range(4):
                t0 = time.perf_counter()
                step_fn(input_ids=ids)
                ts.append(time.perf_counter() - t0)
        res = {"prefill_s": statistics.median(ts[1:])}
    from tp_backend.backend import tp_auto
    kinds = [str(c.kind) for c in tp_auto.plans[-1].collectives]
    res["collectives"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    dist.destroy_process_group()
    worst = dict(res)
    for key in ("saved_mib", "peak_rss_mib"):
        if key in res:
            worst[key] = max(g[key] for g in gathered)
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama", choices=("llama", "small"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    ap.add_argument("--train-compiler", default="inductor", choices=("inductor", "eager"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, sp = args.child
        try:
            res = run_one(args.model, kind, sp == "1", args.batch, args.seq, args.steps,
                          args.compiler)
        except Exception as e:  # noqa: BLE001 - reported as the row's note
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if os.environ.get("RANK", "0") == "0":
            print_result(res)
        return

    if args.model == "llama":
        from forward import checkpoint
        checkpoint("llama")
    else:
        from train import checkpoint
        checkpoint("small")
    kinds = ["train"] + [f"prefill {s}" for s in args.prefill.split(",") if s]
    rows = {}
    common = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps)]
    for kind in kinds:
        compiler = args.train_compiler if kind == "train" else args.compiler
        for sp in ("0", "1"):
            name = f"{kind}{' SP' if sp == '1' else ''}"
            rows[name] = run_child(os.path.abspath(__file__),
                                   common + ["--compiler", compiler, "--child", kind, sp], tp=2)
            print(name, rows[name], flush=True)
    print(f"\nsequence parallelism at TP=2, {args.model}: training step (compiler "
          f"{args.train_compiler}), batch {args.batch} x {args.seq} tokens")
    print(f"{'row':<18} {'step (s)':>9} {'saved act. (MiB)':>16} {'SP / plain':>10} "
          f"{'peak RSS (MiB)':>14}  collectives (forward)")
    for name in ("train", "train SP"):
        r = rows[name]
        if "error" in r:
            print(f"{name:<18} skipped: {r['error']}")
            continue
        base = rows["train"]
        ratio = (r["saved_mib"] / base["saved_mib"]) if "saved_mib" in base else float("nan")
        print(f"{name:<18} {r['step_s']:>9.3f} {r['saved_mib']:>16.1f} {ratio:>9.2f}x "
              f"{r['peak_rss_mib']:>14.0f}  {r['collectives']}")
    print(f"\nprefill, full logits, batch 1 (compiler {args.compiler})")
    print(f"{'row':<18} {'prefill (s)':>11} {'SP / plain':>10}")
    for kind in kinds[1:]:
        for name in (kind, kind + " SP"):
            r = rows[name]
            if "error" in r:
                print(f"{name:<18} skipped: {r['error']}")
                continue
            base = rows[kind].get("prefill_s")
            ratio = r["prefill_s"] / base if base else float("nan")
            print(f"{name:<18} {r['prefill_s']:>11.3f} {ratio:>9.2f}x  {r['collectives']}")
    write_json(rows, args.out or os.path.join(HERE, "results",
                                              f"sequence-parallel-{args.model}.json"))


if __name__ == "__main__":
    main()
