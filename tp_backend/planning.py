"""Plans without processes: what ``tp_auto`` would do to a model at a TP size.

:func:`plan_model` builds the model on the meta device (no weights), lets Dynamo capture
its forward on a meta input, and runs the same pass pipeline as the backend (no process
group is needed to decompose, solve or rewrite). ``python -m tp_backend plan MODEL --tp N``
prints the result (see :func:`format_plan`).

Owns: :func:`plan_model` (the model on meta, captured by a Dynamo backend of its own) and
:func:`format_plan`. Must not: run the passes another way than the backend (it calls
:func:`~tp_backend.pipeline.run_pipeline` as is), read weights or need a process group, or
parse the command line (:mod:`tp_backend.__main__`).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from .naming import NameIndex
from .pipeline import run_pipeline
from .plan import TPPlan
from .rewrite import layer_index

__all__ = ["plan_model", "format_plan"]


def _load_config(model, overrides):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        config = model
    else:
        from .checkpoint import resolve_model_dir

        config = AutoConfig.from_pretrained(resolve_model_dir(model, config_only=True))
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def plan_model(model, *, tp_size: int, seq_len: int = 128, tp_rank: int = 0,
               sequence_parallel: bool = False, lm_head: str = "split", balance: str = "off",
               **config_overrides) -> list[TPPlan]:
    """The plans (one per captured graph) of ``model`` at ``tp_size``.

    Args:
        model: a hub id or checkpoint directory (only its config is read), a
            ``PretrainedConfig``, or an ``nn.Module`` (ideally on the meta device).
        tp_size: number of ranks ``N`` to plan for.
        seq_len: length of the ``[1, seq_len]`` meta input used to capture the forward.
        sequence_parallel: plan with the backend's ``sequence_parallel=True`` option.
        lm_head: the backend's ``lm_head`` option (``"split"`` or ``"replicate"``).
        balance: the backend's ``balance`` option (``"work"`` or ``"off"``); the balance
            models attention at ``seq_len`` tokens.
        **config_overrides: config fields to change first (e.g. ``num_hidden_layers=2``).

    Heads that ``tp_size`` does not divide stay whole (with a warning), as the backend
    does by default.
    """
    if isinstance(model, torch.nn.Module):
        module = model
    else:
        import transformers

        config = _load_config(model, config_overrides)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        with torch.device("meta"):
            module = cls._from_config(config)
    module.eval()
    plans: list[TPPlan] = []
    names = NameIndex([("", module)])  # the module is the root: names as named_parameters()

    def capture(gm, example_inputs):
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fakes = [n.meta["example_value"] for n in ph]
        mode = next(f.fake_mode for f in fakes if isinstance(f, torch.Tensor))
        params, fqns, aliases = set(), {}, {}
        for i, (n, real) in enumerate(zip(ph, example_inputs)):
            if isinstance(real, torch.nn.Parameter):
                params.add(i)
                found = names.tensor(real)
                fqns[i] = found.name if found is not None else n.name
                aliases[i] = found.aliases if found is not None else ()
        _, _, plan = run_pipeline(gm, fakes, mode, params=params, fqns=fqns, presharded={},
                                  tp_size=tp_size, tp_rank=tp_rank, group_name="plan",
                                  aliases=aliases, module_path=lambda n: names.module_path(n, gm),
                                  sequence_parallel=sequence_parallel, lm_head=lm_head,
                                  balance=balance)
        plans.append(plan)
        return gm.forward

    device = next(module.parameters()).device
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=capture)
    with torch.no_grad():
        try:
            compiled(input_ids=ids, use_cache=False)
        except TypeError:
            compiled(input_ids=ids)
    return plans


def _rel(fqn):
    m = re.search(r"(?:^|\.)(\d+)\.(.*)$", fqn)
    return m.group(2) if m else fqn


def format_plan(plan: TPPlan, title: str = "") -> str:
    """Per layer: each parameter's layout and shapes; collectives per layer; bytes per rank.
    Layers with the same layout as the previous one are folded into a range."""
    by_layer = defaultdict(list)
    for p in plan.params.values():
        by_layer[layer_index(p.fqn)].append(p)
    per_ar = plan.collectives_per_layer("all_reduce")
    per_ag = plan.collectives_per_layer("all_gather")
    per_rs = plan.collectives_per_layer("reduce_scatter")

    def describe(layer):
        rows = [(_rel(p.fqn), p.layout, p.global_shape, p.shape_text()) for p in by_layer[layer]]
        counts = f"{per_ar.get(layer, 0)} all-reduce, {per_ag.get(layer, 0)} all-gather"
        if per_rs:
            counts += f", {per_rs.get(layer, 0)} reduce-scatter"
        return tuple(sorted(rows)), counts

    lines = [title] if title else []
    lines.append(plan.summary())
    layers = sorted(k for k in by_layer if k is not None)
    groups = []
    for k in layers:
        d = describe(k)
        if groups and groups[-1][2] == d and groups[-1][1] == k - 1:
            groups[-1][1] = k
        else:
            groups.append([k, k, d])
    if None in by_layer:
        rows, counts = describe(None)
        lines.append(f"outside the layers: {counts}")
        lines += [f"  {lay:9s} {name:50s} {list(g)} -> {l}" for name, lay, g, l in rows]
    for first, last, (rows, counts) in groups:
        span = f"layer {first}" if first == last else f"layers {first}-{last} (each)"
        lines.append(f"{span}: {counts}")
        lines += [f"  {lay:9s} {name:50s} {list(g)} -> {l}" for name, lay, g, l in rows]
    local, full = plan.param_bytes()
    lines.append(f"parameter bytes per rank: {local / 2**30:.3f} GiB; full model: "
                 f"{full / 2**30:.3f} GiB ({local / max(full, 1):.1%})")
    return "\n".join(lines)
