"""Arguments by name (``rules.arg``), local arguments from placements
(``local_args.local_args``) and the rule lookup's cache: the plumbing every rule and the
rewrite rely on. Exact: arguments are Python values, compared with ``==``."""

import torch
import torch.fx as fx

from tp_backend.local_args import local_args
from tp_backend.placement import REPLICATE, Shard
from tp_backend.rules import RULES, arg, lookup, register

aten = torch.ops.aten


def _node(target, args, kwargs=None, val=None):
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 6, 8)
    args = tuple(x if a == "x" else a for a in args)
    n = g.call_function(target, args, kwargs or {})
    n.meta["val"] = val
    return n, x


def test_arg_reads_positions_keywords_and_schema_defaults():
    n, x = _node(aten.sum.dim_IntList, ("x", [1]), {"keepdim": True})
    assert arg(n, "self") is x and arg(n, "dim") == [1] and arg(n, "keepdim") is True
    assert arg(n, "dtype") is None  # keyword-only, not given: the schema's default
    n, _ = _node(aten.topk.default, ("x", 3))
    assert arg(n, "dim") == -1 and arg(n, "largest") is True  # defaults from the schema
    n, _ = _node(aten.sort.stable, ("x",), {"stable": True, "dim": 1})
    assert arg(n, "dim") == 1  # keyword-only in this overload, positional in sort.default
    n, _ = _node(aten.sum.default, ("x",))
    assert arg(n, "dim") is None and arg(n, "dim", default=7) == 7  # no such argument
    n, _ = _node(aten.mm.default, ("x", "x"))
    assert arg(n, "input", "self") is n.args[0]  # the first name the overload has


def test_local_args_from_placements():
    # view: the sharded output dim's size becomes the rank's; -1 stays
    n, x = _node(aten.view.default, ("x", [2, 6, 2, 4]), val=torch.empty(2, 6, 2, 4))
    assert local_args(n, Shard(2), lambda a: Shard(2), 0, 2) == ((x, [2, 6, 1, 4]), {})
    assert local_args(n, REPLICATE, lambda a: REPLICATE, 0, 2) is None
    # reshape names its sizes "shape"; an uneven split gives each rank its own size
    n, x = _node(aten.reshape.default, ("x", [2, 6, 8]), val=torch.empty(2, 6, 8))
    assert local_args(n, Shard(1, units=3), None, 0, 2) == ((x, [2, 4, 8]), {})
    assert local_args(n, Shard(1, units=3), None, 1, 2) == ((x, [2, 2, 8]), {})
    # a slice over the whole sharded dim runs to the local end; one block becomes its run
    n, x = _node(aten.slice.Tensor, ("x", 1, 0, 6), val=torch.empty(2, 6, 8))
    assert local_args(n, Shard(1), lambda a: Shard(1), 0, 2) == ((x, 1, None, None), {})
    n, x = _node(aten.slice.Tensor, ("x", 1, 4, 6), val=torch.empty(2, 2, 8))
    assert local_args(n, Shard(1), lambda a: Shard(1, blocks=(4, 2)), 0, 2) \
        == ((x, 1, 2, 3), {})
    # ... and a slice along another dim is the rank's as written
    n, x = _node(aten.slice.Tensor, ("x", 2, 0, 4), val=torch.empty(2, 6, 4))
    assert local_args(n, Shard(1), lambda a: Shard(1), 0, 2) is None
    # a split of a block-sharded dim: each piece's local size
    n, x = _node(aten.split_with_sizes.default, ("x", [4, 2], 1),
                 val=(torch.empty(2, 4, 8), torch.empty(2, 2, 8)))
    assert local_args(n, (Shard(1), Shard(1)), lambda a: Shard(1, blocks=(4, 2)), 0, 2) \
        == ((x, [2, 1], 1), {})


def test_lookup_sees_a_rule_registered_after_a_lookup():
    op = aten.special_entr.default  # no rule of its own
    old = RULES.get(op)
    assert lookup(op) is old

    def rule(ctx, node):
        return None

    try:
        register(op)(rule)
        assert lookup(op) is rule
    finally:
        if old is None:
            RULES.pop(op, None)
        else:
            RULES[op] = old
        register()(rule)  # (clears the resolved rules again)
    assert lookup(op) is old
