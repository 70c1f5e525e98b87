"""Convolution rule: batch shards, channel shards in whole groups (the depthwise conv1d of
gated DeltaNet and Mamba-2, over a block shard [x | B | C]), column-parallel convolution;
cuts through a group refused. Each accepted decision is simulated rank by rank
(``rule_harness.check``) and compared with the whole op (float32, atol 1e-5 as the
harness: a convolution sums K products per output in another order)."""

import torch

from rule_harness import check
from tp_backend.placement import PARTIAL, REPLICATE, Shard

aten = torch.ops.aten
R, P = REPLICATE, PARTIAL


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def conv(groups, padding=2):
    return lambda x, w, b: aten.convolution(x, w, b, [1], [padding], [1], False, [0], groups)


def test_depthwise_channels_split_with_their_weights():
    x, w, b = r(2, 12, 5), r(12, 1, 3), r(12)
    dec = check(conv(12), [x, w, b], [Shard(1), R, R], params=(1, 2), expect=Shard(1))
    assert dec.args[8] == 6  # this rank's groups
    # the fused [x | B | C] channels of Mamba-2, each block split N ways
    check(conv(12), [x, w, b], [Shard(1, blocks=(8, 2, 2)), R, R], params=(1, 2),
          expect=Shard(1, blocks=(8, 2, 2)))
    # uneven: 3 units of 4 channels, dealt 8 + 4 channels at TP=2
    check(conv(12), [x, w, b], [Shard(1, units=3), R, R], params=(1, 2),
          expect=Shard(1, units=3))
    # a channel multiplier of 2: the output channels follow their groups
    check(conv(12), [x, r(24, 1, 3), r(24)], [Shard(1), R, R], expect=Shard(1))


def test_grouped_channels_split_only_in_whole_groups():
    x = r(2, 12, 5)
    check(conv(6, 1), [x, r(18, 2, 3), r(18)], [Shard(1), R, R],
          expect=Shard(1))  # 3 groups of 2 channels per rank
    # 3 groups of 4 channels: 6 channels per rank at TP=2 cut the middle group; G = 1
    assert check(conv(3, 1), [x, r(6, 4, 3), r(6)], [Shard(1), R, R]) is None
    assert check(conv(1, 1), [x, r(6, 12, 3), r(6)], [Shard(1), R, R]) is None


def test_batch_and_column_splits():
    x, w, b = r(4, 6, 5), r(8, 6, 3), r(8)
    check(conv(1), [x, w, b], [Shard(0), R, R], expect=Shard(0))
    check(conv(1), [x, w, b], [R, Shard(0), Shard(0)], expect=Shard(1))
    check(conv(1), [x, w, b], [P, R, R], expect=R)  # the bias would be added per rank
    # 2-d: the same rules on [B, C, H, W]
    check(lambda x, w: aten.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
          [r(2, 6, 4, 4), r(6, 6, 3, 3)], [R, Shard(0)], expect=Shard(1))
    check(lambda x, w: aten.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
          [r(2, 6, 4, 4), r(6, 6, 3, 3)], [P, R], expect=P)
