"""Tiny random configs of many transformers architectures (the coverage test's zoo).

Every config is shrunk to 2 layers, hidden 64, 4 heads of 16, 4 KV heads, vocab 256, so
TP = 2 and 4 divide every head count; ``make_model(..., tp_size=3)`` widens it by 1.5
(hidden 96, 6 heads of 16, vocab 258), overrides included, so TP = 3 divides them too. The same seed builds the
same weights in every process.
"""

from __future__ import annotations

import torch

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2",
            "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "stablelm",
            "starcoder2", "mixtral", "qwen2_moe", "olmo", "cohere", "codegen", "roformer",
            "gpt_oss"]
ENCODERS = ["bert", "roberta"]
ENCODER_DECODERS = ["t5"]  # relative attention bias per head
ALL = DECODERS + ENCODERS + ENCODER_DECODERS

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)

_EXTRA = {
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "qwen3": dict(head_dim=16),
    "gpt2": dict(n_inner=128, n_positions=64),
    "gptj": dict(n_inner=128, rotary_dim=8, n_positions=64),
    "codegen": dict(n_inner=128, rotary_dim=8, n_positions=64),
    "gpt_bigcode": dict(n_inner=128, n_positions=64, multi_query=False),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=4, parallel_attn=True,
                   bias=False),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": dict(pad_token_id=0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    # experts stored stacked ([E, H, 2I] with gate and up interleaved, per-expert biases),
    # attention sinks, eager attention, alternating sliding-window layers
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=8),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "stablelm": dict(partial_rotary_factor=0.25),
    "starcoder2": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "bert": dict(type_vocab_size=2),
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               decoder_start_token_id=0),
    "roberta": dict(type_vocab_size=1, pad_token_id=1),
    # a rotary table built once and broadcast over heads; its sinusoid table is a frozen
    # nn.Embedding (issue 14's silently wrong model)
    "roformer": dict(is_decoder=True),
}

# Widths and head / group counts (not head sizes) scaled by 1.5 for TP=3, in the base
# config and in the overrides (the linear-attention and Mamba-2 counts of the hybrids test);
# the vocabulary becomes 258 = 3 * 86.
_WIDTHS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "n_inner", "ffn_dim", "word_embed_proj_dim", "d_model", "d_ff", "num_heads",
           "num_kv_heads", "moe_intermediate_size", "shared_expert_intermediate_size",
           "moe_shared_expert_intermediate_size", "linear_num_value_heads",
           "linear_num_key_heads", "mamba_num_heads", "n_groups", "mamba_n_heads",
           "mamba_n_groups", "mamba_d_ssm"}


def make_config(model_type: str, tp_size: int | None = None, **overrides):
    """The tiny config of ``model_type``; ``tp_size=3`` widens it so 3 divides its heads."""
    from transformers import AutoConfig

    def widen(d: dict) -> dict:
        return {k: v * 3 // 2 if k in _WIDTHS else v for k, v in d.items()}

    kw = dict(_BASE)
    kw.update(_EXTRA.get(model_type, {}))
    if tp_size == 3:
        kw = widen(kw)
        kw["vocab_size"] = 258
        overrides = widen(overrides)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def make_model(model_type: str, seed: int = 0, tp_size: int | None = None, **overrides):
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = make_config(model_type, tp_size, **overrides)
    torch.manual_seed(seed)
    from transformers import AutoModelForSeq2SeqLM

    cls = (AutoModel if model_type in ENCODERS else
           AutoModelForSeq2SeqLM if model_type in ENCODER_DECODERS else AutoModelForCausalLM)
    # Built on CPU (the same weights whatever the device), then moved to torch's default
    # device (tests/dist_utils.py: TP_TEST_DEVICE).
    with torch.device("cpu"):
        try:
            model = cls.from_config(cfg, attn_implementation="sdpa").eval()
        except ValueError:  # no SDPA path in this architecture: its eager attention
            torch.manual_seed(seed)
            model = cls.from_config(cfg, attn_implementation="eager").eval()
    return model.to(torch.get_default_device())


def output_of(out):
    """The tensor to compare: logits for LMs, last hidden state for encoders."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def model_inputs(model_type: str, ids):
    """Forward kwargs for a model of ``model_type`` on token ids ``[B, S]``."""
    if model_type in DECODERS:
        return {"input_ids": ids, "use_cache": False}
    if model_type in ENCODER_DECODERS:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5], "use_cache": False}
    return {"input_ids": ids}
