"""Which gloo collectives run on CUDA tensors with two ranks on one GPU, on this torch build:
the set-up the CUDA tests use (``TP_TEST_DEVICE=cuda``: NCCL refuses two ranks on one
device). Part of the GPU check (``benchmarks/gpu_check.sh``, issue 17 item 8).

    torchrun --nproc-per-node 2 benchmarks/gloo_cuda_check.py

Each collective runs in turn, eager ones first, then the functional ones the rewritten
graphs call (``torch.distributed._functional_collectives``), and each rank prints ``OK`` or
``FAIL`` per step. A step that crashes the process (a segmentation fault) ends the run;
``faulthandler`` prints the Python stack of the crash. Seen on an H100 with torch
2.11.0+cu130: every step up to the functional all-reduce ran, the functional all-gather
crashed in ``wait_tensor`` on both ranks.
"""

from __future__ import annotations

import datetime
import faulthandler
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def main() -> None:
    faulthandler.enable()
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    world = dist.group.WORLD

    def cuda(*shape, dtype=torch.float32):
        return torch.ones(*shape, device="cuda", dtype=dtype)

    steps = [
        ("all_reduce (CPU tensor)", lambda: dist.all_reduce(torch.ones(4))),
        ("all_gather_object", lambda: dist.all_gather_object([None, None], rank)),
        ("all_reduce", lambda: dist.all_reduce(cuda(4))),
        ("all_reduce bf16", lambda: dist.all_reduce(cuda(4, dtype=torch.bfloat16))),
        ("broadcast", lambda: dist.broadcast(cuda(4), 0)),
        ("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(cuda(8), cuda(4))),
        ("functional all_reduce", lambda: funcol.all_reduce(cuda(4), "sum", world).wait()),
        ("functional all_gather", lambda: funcol.all_gather_tensor(cuda(4, 2), 0, world).wait()),
        ("functional reduce_scatter",
         lambda: funcol.reduce_scatter_tensor(cuda(4, 2), "sum", 0, world).wait()),
    ]
    for name, fn in steps:
        try:
            fn()
            torch.cuda.synchronize()
            print(f"rank {rank}: OK   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, then the next step
            print(f"rank {rank}: FAIL {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
