"""Microseconds per all-reduce on one host: gloo (the functional collective the rewritten
graphs call, ``_c10d_functional.all_reduce`` + ``wait_tensor``) against DeepSpeed's
shared-memory kernel as tp_backend calls it (``tp_backend::shm_all_reduce``,
:mod:`tp_backend.shm`), float32, 1 thread per rank, interleaved in every round.

    torchrun --nproc-per-node 2 benchmarks/collectives.py [--rounds 5] [--iters 200]
        [--out benchmarks/results/collectives-tp2.json]

Sizes: 6 KiB (one decode token's hidden state, hidden 1536), 64 KiB, 2 MiB (a 512-token
prefill at hidden 1024) and 8 MiB. Reported: the median over rounds of each round's mean
time per call (rank 0), and gloo / shm. Without deepspeed, or where the kernel cannot serve
(more ranks than CPUs, ...), the shm column says why and only gloo is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from _common import print_result, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"6 KiB": 6 << 10, "64 KiB": 64 << 10, "2 MiB": 2 << 20, "8 MiB": 8 << 20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import logging

    from tp_backend import shm
    from tp_backend.collectives import all_reduce

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    served = shm.setup(group, "auto")
    impls = {"gloo": False, **({"shm": True} if served else {})}

    def timed(x, use_shm, iters):
        for _ in range(10):
            all_reduce(x, group.group_name, use_shm)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            all_reduce(x, group.group_name, use_shm)
        return (time.perf_counter() - t0) / iters

    times = {size: {impl: [] for impl in impls} for size in SIZES}
    for _ in range(args.rounds):
        for size, nbytes in SIZES.items():
            x = torch.randn(nbytes // 4)
            iters = max(20, args.iters * (64 << 10) // max(nbytes, 64 << 10))
            for impl, use_shm in impls.items():
                times[size][impl].append(timed(x, use_shm, iters))
    if rank == 0:
        res = {"tp": tp, "rounds": args.rounds, "shm_served": served, "us": {}}
        print(f"\nall-reduce, float32, TP={tp}, 1 thread per rank, median of {args.rounds} "
              "interleaved rounds (us per call)")
        print(f"{'size':8s} {'gloo':>10s} {'shm':>10s} {'gloo/shm':>9s}")
        for size in SIZES:
            row = {impl: 1e6 * statistics.median(ts) for impl, ts in times[size].items()}
            res["us"][size] = row
            shm_col = f"{row['shm']:10.1f}" if "shm" in row else f"{'n/a':>10s}"
            ratio = f"{row['gloo'] / row['shm']:8.1f}x" if "shm" in row else ""
            print(f"{size:8s} {row['gloo']:10.1f} {shm_col} {ratio:>9s}")
        out = args.out or os.path.join(HERE, "results", f"collectives-tp{tp}.json")
        write_json(res, out)
        print_result(res["us"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
