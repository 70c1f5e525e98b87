"""Solver scaling: decomposition and solve time of the same architecture at growing depth.

    python benchmarks/solve_scaling.py [--layers 2 8 30 80] [--tp 3] [--out results/solve_scaling.json]

SmolLM2-135M's shape (hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152) at
each depth, built on the meta device and captured by Dynamo (no weights, no process group:
the solver only needs shapes). Prints a table and writes JSON. Times are wall-clock
seconds on this machine; compare the ratios between depths, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def measure(layers: int, tp: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tp_backend.decompose import decompose
    from tp_backend.solver import solve

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, num_hidden_layers=layers,
                      vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).eval()
    out = {}

    def backend(gm, example_inputs):
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fakes = [n.meta["example_value"] for n in ph]
        mode = next(f.fake_mode for f in fakes if isinstance(f, torch.Tensor))
        t0 = time.perf_counter()
        aten = decompose(gm, fakes, mode)
        t1 = time.perf_counter()
        aph = [n for n in aten.graph.nodes if n.op == "placeholder"]
        params = {aph[i] for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)}
        sol = solve(aten.graph, tp_size=tp, params=params)
        out.update(nodes=len(aten.graph.nodes), decompose_s=t1 - t0, solve_s=sol.seconds,
                   rounds=sol.rounds,
                   sharded_params=sum(s is not None for s in sol.param_storage.values()))
        return gm.forward

    torch._dynamo.reset()
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=backend)(input_ids=torch.zeros(1, 128, dtype=torch.long,
                                                                    device="meta"),
                                              use_cache=False)
    out["capture_total_s"] = time.perf_counter() - t0
    out["layers"] = layers
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 30, 80])
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "solve_scaling.json"))
    args = ap.parse_args()
    rows = [measure(n, args.tp) for n in args.layers]
    print(f"{'layers':>6} {'ATen nodes':>10} {'decompose s':>11} {'solve s':>8} "
          f"{'solve ms/layer':>14} {'rounds':>6}")
    for r in rows:
        print(f"{r['layers']:>6} {r['nodes']:>10} {r['decompose_s']:>11.2f} {r['solve_s']:>8.3f} "
              f"{1e3 * r['solve_s'] / r['layers']:>14.2f} {r['rounds']:>6}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"tp_size": args.tp, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
