"""Ranks that agree (issue 14): sampling with per-rank seeds gives every rank the tokens one
process seeded like rank 0 samples; inputs that differ across ranks raise on every rank,
naming the input; a rank that dies ends the others with an error, not a hang."""

import os

import pytest
import torch

import zoo
from dist_utils import run_distributed

SAMPLE = dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)


def _prompt():
    return torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(3))


def _per_rank_seeds(rank, world_size, options):
    import tp_backend

    model = zoo.make_model("llama")
    model.compile(backend="tp_auto", options={"compiler": "eager", **options})
    torch.manual_seed(100 + rank)  # what a torchrun script that seeds by rank does
    try:
        return model.generate(_prompt(), **SAMPLE).tolist()
    except tp_backend.TPInputMismatchError as e:
        return str(e)


def _reference(seed):
    model = zoo.make_model("llama")
    torch.manual_seed(seed)
    return model.generate(_prompt(), **SAMPLE).tolist()


def test_sampling_with_per_rank_seeds_agrees():
    """Each rank seeded differently; sync_rng="first" (the default) gives every rank rank
    0's random state on the first call, so all sample the single-process tokens of seed
    100. Logits match one process to ~1e-6 (see test_backend_models), far from the
    sampling boundaries of this prompt, so the tokens are equal exactly."""
    seqs = run_distributed(_per_rank_seeds, 2, {})
    assert seqs[0] == seqs[1] == _reference(100)


def test_unsynchronised_sampling_is_caught():
    """With sync_rng off the ranks sample different tokens; the next step's first call
    (the decode graph) sees different token ids and raises on every rank."""
    msgs = run_distributed(_per_rank_seeds, 2, {"sync_rng": "off"})
    for m in msgs:
        assert isinstance(m, str) and "different inputs" in m and "ranks [0] vs [1]" in m, m


def _different_ids(rank, world_size, check):
    import tp_backend

    model = zoo.make_model("llama")
    compiled = torch.compile(model, backend="tp_auto",
                             options={"compiler": "eager", "check_inputs": check})
    ids = _prompt() + rank  # rank 1's tokens differ
    try:
        with torch.no_grad():
            compiled(input_ids=ids)
    except tp_backend.TPInputMismatchError as e:
        return str(e)
    return None


@pytest.mark.parametrize("check", ["first", "always"])
def test_different_inputs_raise_on_every_rank(check):
    msgs = run_distributed(_different_ids, 2, check)
    for m in msgs:
        assert m is not None and "input_ids" in m and "ranks [0] vs [1]" in m, m


def test_check_inputs_off_does_not_check():
    assert run_distributed(_different_ids, 2, "off") == [None, None]


def test_checksum_sees_order_and_shape():
    from tp_backend.consistency import checksum

    a = torch.tensor([1, 2, 3])
    assert not torch.equal(checksum(a), checksum(torch.tensor([3, 2, 1])))
    assert not torch.equal(checksum(a), checksum(torch.tensor([1, 2, 3, 0])))
    assert torch.equal(checksum(a), checksum(a.clone()))


def _dies(rank, world_size, all_reduce):
    import datetime
    import time

    import torch.distributed as dist

    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=10))
    model = zoo.make_model("llama")
    model.compile(backend="tp_auto", options={"compiler": "eager", "tp_group": group,
                                              "all_reduce": all_reduce})
    ids = _prompt()
    for _ in range(2):  # both ranks compiled every graph (the second call recompiles some)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    if rank == 1:
        os._exit(3)  # killed mid-generation
    t0 = time.monotonic()
    try:
        model.generate(ids, max_new_tokens=2, do_sample=False)  # every graph compiled: the
        # next collective is the first all-reduce of the prefill graph
    except Exception as e:  # noqa: BLE001 - what the user sees
        return f"{type(e).__name__}: {str(e)[:300]}", time.monotonic() - t0
    return None, time.monotonic() - t0


def test_dead_rank_ends_the_others_with_an_error():
    """Rank 1 exits mid-generation; rank 0's next collective fails (gloo reports the
    closed connection, or the group's 10 s timeout expires) and raises, instead of
    hanging."""
    from dist_utils import run_each

    (kind0, res0), (kind1, code1) = run_each(_dies, 2, "group", timeout=120)
    assert (kind1, code1) == ("exit", 3)
    assert kind0 == "ok", (kind0, res0)  # rank 0 returned: it did not hang
    err, seconds = res0
    print(f"rank 0 after {seconds:.1f} s: {err}")
    assert err is not None and seconds < 60, res0


def test_dead_rank_during_a_shared_memory_all_reduce_ends_the_others():
    """The same with DeepSpeed's shared-memory all-reduce, whose kernel waits without a
    timeout: tp_backend's watchdog sees the dead peer and ends rank 0 with exit code 1
    (and a message) within seconds, instead of leaving it spinning forever."""
    pytest.importorskip("deepspeed", reason="the shared-memory all-reduce needs tp_backend[shm]")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: the kernel is not used with more ranks than CPUs")
    from dist_utils import run_each

    (kind0, res0), (kind1, code1) = run_each(_dies, 2, "shm", timeout=120)
    assert (kind1, code1) == ("exit", 3)
    assert (kind0, res0) == ("exit", 1)  # ended by the watchdog, not killed at the timeout
