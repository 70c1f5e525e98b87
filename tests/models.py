"""Tiny random Hugging Face models for the tests (deterministic: the same seed gives the
same weights in every process)."""

from __future__ import annotations

import torch

# Head counts divide 1, 2 and 4 so every model runs at TP = 1, 2, 4.
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)


def make_config(name: str, **overrides):
    from transformers import AutoConfig

    kw = dict(_COMMON)
    if name == "gemma":
        kw["head_dim"] = 16  # 8 heads x 16 = 128 != hidden 64: head_dim unrelated to hidden
    if name == "qwen2":
        kw["use_sliding_window"] = False
    kw.update(overrides)
    return AutoConfig.for_model(name, **kw)


def make_model(name: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(name, **overrides),
                                             attn_implementation="sdpa")
    return model.eval()


def make_ids(batch=2, seq=7, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
