"""parallelize_model: meta-device build and per-rank sharded safetensors loading.

A tiny random Llama with tied embeddings is saved as a multi-file checkpoint (small
max_shard_size); at TP=2 the loaded model's logits equal from_pretrained + eager, each
rank holds and reads only its slices, and bad checkpoints raise clear errors on every
rank."""

import json
import os

import pytest
import torch

from dist_utils import run_distributed
from models import make_ids, make_model

ATOL = 1e-5  # fp32, reordered sums only (see test_backend_models.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_model("llama", tie_word_embeddings=True, seed=3)
    model.save_pretrained(path, max_shard_size="60KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    return str(path)


def _load_and_compare(rank, world_size, path):
    import tp_backend
    from tp_backend import checkpoint as ckpt
    from transformers import AutoModelForCausalLM

    ckpt.READS.clear()
    model = tp_backend.parallelize_model(path)
    reads_at_load = list(ckpt.READS)
    bytes_at_load = tp_backend.local_parameter_bytes(model)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = make_ids(seed=5)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
        ref = ref_model(input_ids=ids, use_cache=False).logits
    reads = list(ckpt.READS)
    inner = model
    emb, head = inner.model.embed_tokens.weight, inner.lm_head.weight
    plan = tp_backend.last_plan()
    return {
        "err": (out - ref).abs().max().item(),
        "tied_same": emb is head and tp_backend.local_shard(emb) is tp_backend.local_shard(head),
        "local_shapes": {n: tuple(tp_backend.local_shard(p).shape)
                         for n, p in inner.named_parameters()},
        "global_shapes": {n: tuple(p.shape) for n, p in ref_model.named_parameters()},
        "layouts": {k: v.layout for k, v in plan.params.items()},
        "reads": reads,
        "reads_at_load": reads_at_load,
        "bytes_at_load": bytes_at_load,
        "local_bytes": tp_backend.local_parameter_bytes(inner),
        "full_bytes": sum(p.nbytes for p in ref_model.parameters()),
    }


def test_multi_file_checkpoint_tp2(checkpoint):
    res = run_distributed(_load_and_compare, 2, checkpoint)
    for rank, r in enumerate(res):
        # parallelize_model reads nothing: the first call solves the plan, then reads.
        assert r["reads_at_load"] == [] and r["bytes_at_load"] == 0, r["reads_at_load"]
        assert r["err"] <= ATOL, (rank, r["err"])
        assert r["tied_same"], "tied embedding and LM head must be one parameter and one shard"
        for name, local in r["local_shapes"].items():
            glob = r["global_shapes"][name]
            layout = r["layouts"].get(name, "replicate")
            if layout == "replicate":
                assert local == glob, name
            else:  # exactly one dim halved
                assert sum(a != b for a, b in zip(local, glob)) == 1, (name, local, glob)
                assert sum(local) < sum(glob)
        # Reads: one per distinct parameter, each of the local shape -- no rank ever read a
        # whole sharded tensor.
        read_shapes = {name: shape for name, shape, _ in r["reads"]}
        assert len(r["reads"]) == len(read_shapes) == len(r["local_shapes"])
        for name, shape in read_shapes.items():
            assert shape == r["local_shapes"][name], (name, shape)
        assert sum(b for _, _, b in r["reads"]) == r["local_bytes"] < 0.55 * r["full_bytes"]
    assert res[0]["layouts"]["model.embed_tokens.weight"] == "vocab"


def _state_before_first_call(rank, world_size, path):
    import tp_backend
    from tp_backend import checkpoint as ckpt
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    ref = {k: v.clone() for k, v in ref_model.state_dict().items()}
    model = tp_backend.parallelize_model(path)
    try:  # an eager call would compute on the NaN placeholders
        model.model.layers[0].mlp(torch.zeros(1, 2, ref_model.config.hidden_size))
        eager = "no error"
    except tp_backend.TPShardedModuleError as e:
        eager = str(e)
    sd = model.state_dict()  # never called: every weight still in the checkpoint
    state_err = max((sd[k] - v).abs().max().item() for k, v in ref.items())
    whole_reads = len(ckpt.READS)
    # load_state_dict before the first call: other weights (the reference's, scaled), then
    # the model must compute with them, not with the checkpoint's.
    with torch.no_grad():
        for p in ref_model.parameters():
            p.mul_(0.5)
    model.load_state_dict(ref_model.state_dict())
    ids = make_ids(seed=5)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
        want = ref_model(input_ids=ids, use_cache=False).logits
    after = model.state_dict()
    return {"keys_same": sorted(sd) == sorted(ref), "state_err": state_err,
            "whole_reads": whole_reads, "err": (out - want).abs().max().item(),
            "eager": eager,
            "after_err": max((after[k] - v).abs().max().item()
                             for k, v in ref_model.state_dict().items()),
            "sharded": len(tp_backend.last_plan().params)}


def test_state_before_first_call(checkpoint):
    """Before its first call a parallelize_model'd model holds no weights (the first call
    reads each rank's slices): an eager call of one of its modules raises, state_dict()
    gives the checkpoint's values (read whole, bitwise), and load_state_dict() replaces
    them: the first call then computes with the loaded weights and splits them (fp32,
    reordered sums only, as ATOL says)."""
    for r in run_distributed(_state_before_first_call, 2, checkpoint):
        assert r["keys_same"] and r["state_err"] == 0 and r["whole_reads"] > 0, r
        assert "parallelize_model reads" in r["eager"], r["eager"]
        assert r["err"] <= ATOL and r["after_err"] == 0 and r["sharded"] > 0, r


def _generate_twice(rank, world_size, path):
    import tp_backend
    from transformers import AutoModelForCausalLM

    model = tp_backend.parallelize_model(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = make_ids(seed=7)
    kw = dict(do_sample=False)
    first = model.generate(ids, max_new_tokens=3, min_new_tokens=3, **kw)
    graphs = tp_backend.tp_auto.stats["graphs"]
    second = model.generate(ids, max_new_tokens=6, min_new_tokens=6, **kw)
    norm = model.model.norm.weight  # kept whole: its layout is the placeholder's
    return {"first": first.tolist(), "second": second.tolist(),
            "ref": ref_model.generate(ids, max_new_tokens=6, min_new_tokens=6, **kw).tolist(),
            "graphs": (graphs, tp_backend.tp_auto.stats["graphs"]),
            "norm_stride": norm.stride(),
            "norm_local": torch.equal(tp_backend.local_shard(norm), ref_model.model.norm.weight)}


def test_second_generate_compiles_nothing(checkpoint):
    """The first call reads the weights; the parameters it keeps whole keep the layout
    Dynamo traced (their values live in the store, as split ones' do), so the second
    generate reuses every graph (a changed layout would fail Dynamo's guard and compile the
    prefill again, with a dynamic length). Greedy tokens equal one process's."""
    for r in run_distributed(_generate_twice, 2, checkpoint):
        assert r["second"] == r["ref"] and r["first"] == [t[:-3] for t in r["ref"]], r
        assert r["graphs"][0] == r["graphs"][1], r["graphs"]
        assert r["norm_stride"] == (0,) and r["norm_local"], r


def _whole_values_change(rank, world_size, path):
    import tp_backend
    from tp_backend.runtime import STORE
    from transformers import AutoModelForCausalLM

    model = tp_backend.parallelize_model(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = make_ids(seed=6)
    errs = []
    with torch.no_grad():
        want = ref_model(input_ids=ids, use_cache=False).logits
        for _ in range(2):  # the second call reuses the values the first one fed
            errs.append((model(input_ids=ids, use_cache=False).logits - want).abs().max().item())
        # A new value for the final norm's weight (kept whole), put in the store as a new
        # tensor (same parameter): the next call must feed it, not the one it fed before.
        norm = model.model.norm.weight
        scale = torch.linspace(0.5, 1.5, norm.shape[0])
        before = norm in STORE.whole
        STORE.whole[norm] = STORE.whole[norm] * scale
        ref_model.model.norm.weight.mul_(scale)
        want = ref_model(input_ids=ids, use_cache=False).logits
        errs.append((model(input_ids=ids, use_cache=False).logits - want).abs().max().item())
    return {"errs": errs, "kept_whole": before}


def test_whole_values_follow_the_store(checkpoint):
    """The runner reuses the values of the parameters kept whole that it fed on the last
    call (no lookup per parameter) only while the store has not changed: a value replaced
    in the store after two calls is the one the third call computes with (ATOL: reordered
    fp32 sums)."""
    for r in run_distributed(_whole_values_change, 2, checkpoint):
        assert r["kept_whole"], r
        assert max(r["errs"]) <= ATOL, r


def _fallback_loaded(rank, world_size, path):
    import tp_backend
    from tp_backend import backend
    from tp_backend.errors import TPPassError
    from transformers import AutoModelForCausalLM

    def fail(*args, **kwargs):  # this worker only: every graph falls back to replicated
        raise TPPassError("failed on purpose for the test", "solver")

    backend.run_pipeline = fail
    model = tp_backend.parallelize_model(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = make_ids(seed=5)
    with torch.no_grad():
        outs = [model(input_ids=ids, use_cache=False).logits for _ in range(2)]
        ref = ref_model(input_ids=ids, use_cache=False).logits
    return [(o - ref).abs().max().item() for o in outs]


@pytest.mark.inductor
def test_replicated_fallback_of_a_loaded_model(checkpoint):
    """A graph that cannot be split runs replicated: the first call reads the weights whole
    into the store, and Inductor compiles the graph for them as the runner feeds them
    (contiguous), not for the placeholders Dynamo traced (stride 0). Logits within ATOL of
    one process (Inductor against eager: reordered fp32 sums)."""
    for errs in run_distributed(_fallback_loaded, 2, checkpoint):
        assert max(errs) <= ATOL, errs


def _load_tp1(rank, world_size, path):
    import tp_backend
    from transformers import AutoModelForCausalLM

    model = tp_backend.parallelize_model(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = make_ids(seed=5)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
        ref = ref_model(input_ids=ids, use_cache=False).logits
    return (out - ref).abs().max().item()


def test_single_rank_reads_every_weight(checkpoint):
    """TP=1: nothing to split; every weight is read whole and the model computes the
    checkpoint's numbers (Inductor vs eager: reordered fp32 sums only, as ATOL says)."""
    [err] = run_distributed(_load_tp1, 1, checkpoint)
    assert err <= ATOL, err


def _expect_error(rank, world_size, path):
    import tp_backend

    try:
        tp_backend.parallelize_model(path)
    except (tp_backend.TPWeightError, tp_backend.TPConfigError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tensor(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    for msg in run_distributed(_expect_error, 2, str(path)):
        assert msg.startswith("TPWeightError") and "model.layers.1.mlp.up_proj.weight" in msg, msg


def test_missing_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    victim = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[-1]
    os.remove(path / victim)
    for msg in run_distributed(_expect_error, 2, str(path)):
        assert msg.startswith("TPWeightError") and victim in msg, msg


def test_truncated_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    victim = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    for msg in run_distributed(_expect_error, 2, str(path)):
        assert msg.startswith("TPWeightError") and victim in msg, msg


def test_directory_without_config(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    os.remove(path / "config.json")
    for msg in run_distributed(_expect_error, 2, str(path)):
        assert msg.startswith("TPConfigError") and "config.json" in msg, msg


def test_config_without_architectures(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["architectures"]
    (path / "config.json").write_text(json.dumps(cfg))
    for msg in run_distributed(_expect_error, 2, str(path)):
        assert msg.startswith("TPConfigError") and "architectures" in msg, msg


def _skip_load(rank, world_size):
    import tp_backend
    from models import make_config

    torch.manual_seed(11)
    model = tp_backend.parallelize_model(_SKIP_DIR, skip_load_weights=True)
    torch.manual_seed(11)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(make_config("llama")).eval()
    ids = make_ids()
    with torch.no_grad():
        return (model(input_ids=ids, use_cache=False).logits
                - ref(input_ids=ids, use_cache=False).logits).abs().max().item()


_SKIP_DIR = None


def _skip_load_entry(rank, world_size, path):
    global _SKIP_DIR
    _SKIP_DIR = path
    return _skip_load(rank, world_size)


def test_skip_load_weights_equals_seeded_init(tmp_path):
    from models import make_config

    make_config("llama", architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    for err in run_distributed(_skip_load_entry, 2, str(tmp_path)):
        assert err <= ATOL, err


def _from_hub_cache(rank, world_size, cache_dir):
    import tp_backend

    model = tp_backend.parallelize_model("tiny-org/tiny-llama", cache_dir=cache_dir)
    ids = make_ids(seed=5)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_hub_id_resolved_offline_from_hf_cache(checkpoint, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub: a cache laid out as the hub lays it out
    (models--org--name/snapshots/<commit>, refs/main) and HF_HUB_OFFLINE=1 (no network)."""
    import shutil

    from transformers import AutoModelForCausalLM

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outs = run_distributed(_from_hub_cache, 2, str(tmp_path / "hub"))
    ref_model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=make_ids(seed=5), use_cache=False).logits
    for out in outs:
        assert (out - ref).abs().max().item() <= ATOL


def test_minimum_transformers_check(monkeypatch):
    """The reference's version check and its message are kept."""
    import importlib.metadata as importlib_metadata

    from tp_backend.api import check_transformers_version

    check_transformers_version()  # the installed version passes
    monkeypatch.setattr(importlib_metadata, "version", lambda name: "4.19.2")
    with pytest.raises(ImportError, match="Found an incompatible version of transformers. "
                                          "Found version 4.19.2, but only 4.20.0 and above"):
        check_transformers_version()


def test_unknown_override_names_the_key(checkpoint):
    import tp_backend

    with pytest.raises(ValueError, match="'num_hidden_layerz'"):
        tp_backend.parallelize_model(checkpoint, num_hidden_layerz=1)


def _odd_vocab_load(rank, world_size, path):
    import tp_backend
    from transformers import AutoModelForCausalLM

    model = tp_backend.parallelize_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = make_ids(vocab=131, seed=2)
    with torch.no_grad():
        err = (model(input_ids=ids, use_cache=False).logits
               - ref(input_ids=ids, use_cache=False).logits).abs().max().item()
    return err, tuple(tp_backend.local_shard(model.model.embed_tokens.weight).shape)


def test_padded_vocabulary_loaded_from_checkpoint(tmp_path):
    """131 tokens at TP=2: each rank reads its real rows and pads the last with zeros."""
    make_model("llama", tie_word_embeddings=True, vocab_size=131).save_pretrained(tmp_path)
    for err, shape in run_distributed(_odd_vocab_load, 2, str(tmp_path)):
        assert err <= ATOL and shape == (66, 64), (err, shape)


def _train_loaded(rank, world_size, path):
    import tp_backend
    from transformers import AutoModelForCausalLM

    from test_training import compare_grads

    model = tp_backend.parallelize_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    ref.train()
    ids = make_ids(seed=5)
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    return {**compare_grads(model, ref),
            "trainable": all(p.requires_grad for p in model.parameters())}


def test_loaded_model_trains(checkpoint):
    """A model loaded by parallelize_model at TP=2 is trainable like from_pretrained's:
    its parameters require grad, and backward gives the single-process gradients (the
    tolerance of test_training.py)."""
    from test_training import REL_TOL

    for r in run_distributed(_train_loaded, 2, checkpoint):
        assert r["trainable"] and not r["missing"] and r["sharded"] > 0, r
        assert r["worst"] <= REL_TOL, r
