"""Memory and time of the language-model loss on vocab-split logits: the vocab-parallel
cross-entropy (``tp_backend::vocab_parallel_cross_entropy``) against gathering the logits
and running ``F.cross_entropy`` on the whole of them (what ``tp_auto`` did before), and one
process on the whole logits.

    python benchmarks/vocab_loss.py [--tokens 2048] [--vocab 32000] [--reps 3]
        [--out benchmarks/results/vocab_loss.json]

Each row runs in its own process (group): the logits ``[N, V]`` (fp32, ``N = --tokens``),
this rank's ``[N, V/2]`` at TP=2, are made first; then one forward and backward of the loss
(mean over the tokens, 1/8 of the targets ``-100``). Reported per rank: the peak RSS the
loss added above what the process held before it (``ru_maxrss`` after minus before: a
fresh process per row, so the peak is that row's), and the median time of ``--reps``
forward+backward passes. Rows: ``one process`` (whole logits), ``gathered TP=2``
(all-gather through ``tp_backend``'s differentiable gather, then ``F.cross_entropy``),
``vocab-parallel TP=2``.

Then the same in a model (``--no-model`` skips it): a training step (forward with
``labels``, backward) of a small random Llama (hidden 256, 2 layers, vocab ``--vocab``) on
``--tokens`` tokens (batch 4), compiled with ``tp_auto`` at TP=2 with the logits it returns
gathered (``outputs="gather"``, the default) or kept split (``outputs="split"``), and one
process in eager. Reported per rank: the peak of the resident set during the step above
its level before the step (sampled every 0.5 ms from ``/proc/self/statm`` by a thread, the
first step, which compiles, excluded) and the median step time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import print_result, run_child, write_json  # noqa: E402

ROWS = [("one process", "whole", 1), ("gathered TP=2", "gathered", 2),
        ("vocab-parallel TP=2", "vocab_parallel", 2)]
MODEL_ROWS = [("model, one process", "model_eager", 1),
              ("model TP=2, outputs=gather", "model_gather", 2),
              ("model TP=2, outputs=split", "model_split", 2)]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _PeakRSS:
    """The highest resident set size (MiB) seen while the ``with`` block runs, minus the
    size at its start: a thread samples ``/proc/self/statm`` every 0.5 ms."""

    def __enter__(self):
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE") / 2**20
        self.start = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _now(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())
        self.added = self.peak - self.start


def run_model(impl: str, tokens: int, vocab: int, reps: int) -> dict:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import tp_backend  # noqa: F401

    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, vocab, (4, tokens // 4), generator=torch.Generator().manual_seed(0))
    rank, world = 0, 1
    step = model
    if impl != "model_eager":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        step = torch.compile(model, backend="tp_auto",
                             options={"outputs": impl.split("_")[1], "compiler": "eager"})

    def train_step():
        out = step(input_ids=ids, labels=ids)
        out.loss.backward()
        return out

    train_step()  # compiles
    model.zero_grad(set_to_none=True)
    times, peak = [], 0.0
    for _ in range(reps):
        with _PeakRSS() as m:
            t0 = time.perf_counter()
            out = train_step()
            times.append(time.perf_counter() - t0)
            logits_local = getattr(out.logits, "to_local", lambda: out.logits)()
            loss = out.loss.item()
            del out
        model.zero_grad(set_to_none=True)
        peak = max(peak, m.added)
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        peak = max(peaks)
        dist.destroy_process_group()
    return {"loss_peak_mib": peak, "time_s": statistics.median(times), "loss": loss,
            "logits_local_mib": logits_local.numel() * 4 / 2**20}


def run_one(impl: str, tokens: int, vocab: int, reps: int) -> dict:
    import torch.distributed as dist

    if impl.startswith("model"):
        return run_model(impl, tokens, vocab, reps)

    import tp_backend  # noqa: F401  (registers the ops)
    from tp_backend import conjugates

    torch.set_num_threads(1)
    rank, world = 0, 1
    if impl != "whole":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name if world > 1 else None
    step = vocab // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, step, generator=g).requires_grad_(True)  # this rank's logits
    target = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))
    target[::8] = -100

    def loss_fn():
        if impl == "whole":
            return F.cross_entropy(x, target)
        if impl == "gathered":
            whole = conjugates.gather(x, 1, 1, rank, world, group)
            return F.cross_entropy(whole, target)
        return torch.ops.tp_backend.vocab_parallel_cross_entropy(
            x, target, rank * step, vocab, group, 1, -100, 0.0)[0]

    before = _maxrss_mib()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        x.grad = None
        times.append(time.perf_counter() - t0)
    peak = _maxrss_mib() - before
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        peak = max(peaks)
        dist.destroy_process_group()
    return {"loss_peak_mib": peak, "time_s": statistics.median(times), "loss": loss.item(),
            "logits_local_mib": x.numel() * 4 / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-model", action="store_true", help="skip the model rows")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        try:
            res = run_one(args.child, args.tokens, args.vocab, args.reps)
        except Exception as e:  # noqa: BLE001 - reported as the row's note
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if os.environ.get("RANK", "0") == "0":
            print_result(res)
        return

    rows = {}
    for name, impl, ranks in ROWS + ([] if args.no_model else MODEL_ROWS):
        rows[name] = run_child(os.path.abspath(__file__),
                               ["--tokens", str(args.tokens), "--vocab", str(args.vocab),
                                "--reps", str(args.reps), "--child", impl], tp=ranks)
    print(f"loss over [{args.tokens}, {args.vocab}] fp32 logits (whole: "
          f"{args.tokens * args.vocab * 4 / 2**20:.0f} MiB), forward + backward, per rank")
    _table(rows, [n for n, _, _ in ROWS], "gathered TP=2")
    if not args.no_model:
        print("\ntraining step of a small Llama with labels (peak RSS above the step's start)")
        _table(rows, [n for n, _, _ in MODEL_ROWS], "model TP=2, outputs=gather")
    out = args.out or os.path.join(HERE, "results", "vocab_loss.json")
    write_json({"tokens": args.tokens, "vocab": args.vocab, "rows": rows}, out)


def _table(rows: dict, names: list, base_name: str) -> None:
    base = rows[base_name].get("loss_peak_mib")
    print(f"{'row':<28} {'peak MiB':>9} {'vs ' + base_name.split(',')[-1].strip():>16} "
          f"{'time s':>8} {'loss':>8}")
    for name in names:
        r = rows[name]
        if "error" in r:
            print(f"{name:<28} error: {r['error']}")
            continue
        ratio = f"{r['loss_peak_mib'] / base:.2f}x" if base else "-"
        print(f"{name:<28} {r['loss_peak_mib']:>9.0f} {ratio:>16} {r['time_s']:>8.3f} "
              f"{r['loss']:>8.4f}")


if __name__ == "__main__":
    main()
