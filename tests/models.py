"""Tiny random Hugging Face models for the backend and loading tests: the zoo's configs
(tests/zoo.py) with 8 query heads and a 128-token vocabulary (deterministic: the same seed
gives the same weights in every process)."""

from __future__ import annotations

import torch

import zoo

# 8 query and 4 KV heads divide TP = 1, 2, 4; Gemma keeps head_dim 16 (8 x 16 = 128 !=
# hidden 64: head_dim unrelated to hidden).
_OVERRIDES = dict(vocab_size=128, num_attention_heads=8, num_key_value_heads=4)


def make_config(name: str, **overrides):
    return zoo.make_config(name, **{**_OVERRIDES, **overrides})


def make_model(name: str, seed: int = 0, **overrides):
    return zoo.make_model(name, seed, **{**_OVERRIDES, **overrides})


def make_ids(batch=2, seq=7, vocab=128, seed=1, low=0):
    """Token ids ``[batch, seq]`` in ``[low, vocab)``: drawn on CPU (the same ids in the
    test process and in every rank, whatever the device), on torch's default device."""
    return torch.randint(low, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed),
                         device="cpu").to(torch.get_default_device())
