"""Command line: ``python -m tp_backend plan MODEL --tp N``.

Owns: the command line (``main``: its arguments and what it prints). Must not: plan or
format anything itself (:func:`tp_backend.planning.plan_model` and
:func:`~tp_backend.planning.format_plan` do), start processes or read weights.
"""

from __future__ import annotations

import argparse
import sys
import time


from .options import BALANCE_CHOICES, LM_HEAD_CHOICES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tp_backend")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the tensor-parallel plan of a model (meta device, "
                       "no weights, no processes)")
    p.add_argument("model", help="hub id or directory with a config.json")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size N")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the traced input")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="plan with sequence parallelism (the sequence_parallel option)")
    p.add_argument("--lm-head", choices=LM_HEAD_CHOICES, default="split",
                   help="the LM head vocab-parallel (default) or whole on every rank (the "
                        "lm_head option)")
    p.add_argument("--balance", choices=BALANCE_CHOICES, default="off",
                   help="split evenly (default) or even out the ranks' modelled work where "
                        "heads split unevenly ('work'): the balance option")
    args = parser.parse_args(argv)

    from .planning import format_plan, plan_model

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    t0 = time.perf_counter()
    plans = plan_model(args.model, tp_size=args.tp, seq_len=args.seq,
                       sequence_parallel=args.sequence_parallel, lm_head=args.lm_head,
                       balance=args.balance, **overrides)
    for i, plan in enumerate(plans):
        title = f"{args.model} at tp_size={args.tp}" + (f" (graph {i + 1})" if len(plans) > 1 else "")
        print(format_plan(plan, title))
    print(f"planned in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
