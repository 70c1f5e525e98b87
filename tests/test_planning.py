"""Planning without processes: the plan CLI on a Llama-70B-sized config at TP=8 (meta
device), and the automatic plans compared with transformers' hand-written
``base_model_tp_plan`` where one exists, with every difference documented."""

import json
import re
import subprocess
import sys

import pytest

import zoo

pytestmark = pytest.mark.slow

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
             "num_hidden_layers": 80, "vocab_size": 128256, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_plan_cli_llama70b_tp8(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    out = subprocess.run([sys.executable, "-m", "tp_backend", "plan", str(tmp_path), "--tp", "8"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    print(text)
    assert "layers 0-79 (each): 2 all-reduce, 0 all-gather" in text
    assert re.search(r"column\s+self_attn\.q_proj\.weight\s+\[8192, 8192\] -> \[1024, 8192\]", text)
    assert re.search(r"row\s+mlp\.down_proj\.weight\s+\[8192, 28672\] -> \[8192, 3584\]", text)
    m = re.search(r"parameter bytes per rank: ([\d.]+) GiB; full model: ([\d.]+) GiB", text)
    per_rank, full = float(m.group(1)), float(m.group(2))
    assert 130 < full < 133  # 70.6e9 bf16 parameters
    assert per_rank < full / 8 * 1.01  # only the norms are replicated


SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-05}


def test_plan_cli_shows_uneven_heads(tmp_path):
    """Issue 15: SmolLM2-135M's 9 heads at TP=2 go 5 + 4; the plan shows the ranks' sizes
    of the query projection's rows and the output projection's columns as ``320|256``,
    the key/value projections whole (3 KV heads cannot follow 5 + 4), and no warning."""
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    out = subprocess.run([sys.executable, "-m", "tp_backend", "plan", str(tmp_path), "--tp", "2",
                          "--layers", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    print(text)
    assert re.search(r"column\s+self_attn\.q_proj\.weight\s+\[576, 576\] -> \[320\|256, 576\]", text)
    assert re.search(r"row\s+self_attn\.o_proj\.weight\s+\[576, 576\] -> \[576, 320\|256\]", text)
    assert re.search(r"replicate\s+self_attn\.k_proj\.weight\s+\[192, 576\] -> \[192, 576\]", text)
    assert re.search(r"row\s+mlp\.down_proj\.weight\s+\[576, 1536\] -> \[576, 768\]", text)
    assert "layers 0-1 (each): 2 all-reduce" in text
    assert "TPDivisibilityError" not in out.stderr and "not divisible" not in out.stderr


def test_uneven_heads_settle_in_rounds_independent_of_depth(tmp_path):
    """Every layer of SmolLM2 asks its query projection for whole heads (9 -> 5 + 4) in the
    same round: the view that asks decides provisionally as if granted, so the output
    projection stays row-parallel and the next layer's view asks too. The solver's rounds
    then do not grow with depth (one per layer before: 33 at 30 layers), and the plans are
    the same layer for layer."""
    from tp_backend.planning import format_plan, plan_model

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    shallow, = plan_model(str(tmp_path), tp_size=2, seq_len=16, num_hidden_layers=2)
    deep, = plan_model(str(tmp_path), tp_size=2, seq_len=16, num_hidden_layers=8)
    assert deep.rounds == shallow.rounds <= 4, (shallow.rounds, deep.rounds)
    for plan, n in ((shallow, 2), (deep, 8)):
        text = format_plan(plan)
        assert f"layers 0-{n - 1} (each): 2 all-reduce" in text, text
        assert re.search(r"column\s+self_attn\.q_proj\.weight\s+\[576, 576\] -> "
                         r"\[320\|256, 576\]", text), text


# transformers' style -> our layout
_STYLE = {"colwise": "column", "colwise_gather_output": "column", "packed_colwise": "column",
          "rowwise": "row", "rowwise_split_input": "row",
          "replicated_with_grad_allreduce": "replicate",
          "embedding_rowwise": "vocab"}  # the table's rows (the vocabulary) split

# Where our automatic plan differs from the hand-written one, and why ours is right.
DOCUMENTED = {
    # transformers splits Phi-3's fused qkv_proj / gate_up_proj column-wise and gathers the
    # output (a contiguous split would cut across q|k|v), then splits the next layer's input
    # again. We split each block (q, k, v; gate, up) separately, so no gather is needed and
    # the following layer stays row-parallel: same layouts, fewer collectives.
    ("phi3", "layers.*.self_attn.qkv_proj"): "same layout, no gather (block shard)",
    ("phi3", "layers.*.mlp.gate_up_proj"): "same layout, no gather (block shard)",
}


@pytest.mark.parametrize("model_type", [t for t in zoo.ALL
                                        if getattr(zoo.make_config(t), "base_model_tp_plan", None)])
def test_matches_transformers_tp_plan(model_type):
    from tp_backend.planning import plan_model

    config = zoo.make_config(model_type)
    plan, = plan_model(config, tp_size=2, seq_len=8)
    layouts = {fqn: p.layout for fqn, p in plan.params.items()}
    checked = 0
    for pattern, style in config.base_model_tp_plan.items():
        if style not in _STYLE:
            continue  # module-level hooks such as "moe_tp_experts"
        rx = re.compile(r"(?:^|\.)" + re.escape(pattern).replace(r"\*", r"\d+") + r"(?:\.weight)?$")
        hits = {fqn: lay for fqn, lay in layouts.items() if rx.search(fqn)}
        if not hits:
            # e.g. qwen2_moe's plan names layers.*.mlp.gate_proj, but its MLP is a MoE
            # block (experts + shared_expert.*): the hand-written entry matches nothing.
            print(f"{model_type}: {pattern!r} ({style}) names no parameter of the model")
            continue
        for fqn, lay in hits.items():
            checked += 1
            assert lay == _STYLE[style], (model_type, fqn, lay, style)
    assert checked
