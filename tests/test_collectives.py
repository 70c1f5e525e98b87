"""Collectives on gloo: all-gather inverts every shard layout (plain, strided, blocks,
uneven) on any dim; all-reduce sums."""

import torch

from dist_utils import run_distributed


def _gather_cases(rank, world_size):
    import torch.distributed as dist

    from tp_backend.collectives import all_gather, all_reduce
    from tp_backend.layers import local_shard

    name = dist.group.WORLD.group_name
    x = torch.randn(4, 12, 6, generator=torch.Generator().manual_seed(0))
    ok = []
    for dim, outer, blocks in [(0, 1, None), (1, 1, None), (2, 1, None), (1, 2, None),
                               (1, 1, (6, 4, 2))]:
        local = local_shard(x, dim, outer, rank, world_size, blocks)
        ok.append(torch.equal(all_gather(local, dim, outer, world_size, name, blocks), x))
    # uneven splits (issue 15): 3 units of 4 over 2 ranks (8 + 4), also inside 2 blocks;
    # the exact comparison holds because gathering only moves values
    for dim, outer, units in [(1, 1, 3), (1, 2, 3), (2, 1, 3)]:
        local = local_shard(x, dim, outer, rank, world_size, None, units)
        ok.append(torch.equal(all_gather(local, dim, outer, world_size, name, None, rank,
                                         units=units), x))
    y = torch.full((3,), float(rank + 1))
    ok.append(torch.equal(all_reduce(y, name), torch.full((3,), 3.0)))
    return ok


def test_all_gather_inverts_every_layout():
    for ok in run_distributed(_gather_cases, 2):
        assert all(ok), ok
