"""The same-host shared-memory all-reduce (tp_backend.shm, DeepSpeed's kernel): exact
against one process and against the group's all-reduce, really called where it serves,
refused with a clear error where it cannot, and the op alone sums like gloo; its watchdog
spares a rank whose peer finished the all-reduce and exited (ending a rank whose peer died
mid-way is tested in test_consistency.py). Skipped without deepspeed (CI installs it)."""

import importlib.util
import os

import pytest
import torch

import zoo
from dist_utils import run_distributed

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="the shared-memory all-reduce needs deepspeed "
                                            "(tp_backend's shm extra)")


def _ids():
    return torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(5))


def _shm_calls(prof) -> int:
    return sum(e.count for e in prof.key_averages() if "shm_all_reduce" in e.key)


def _forward_and_generate(rank, world_size, all_reduce):
    from tp_backend.backend import tp_auto

    model = zoo.make_model("llama")
    model.compile(backend="tp_auto", options={"all_reduce": all_reduce})
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = model(_ids()).logits
    tokens = model.generate(_ids()[:1, :6], max_new_tokens=8, do_sample=False)
    return logits, tokens, _shm_calls(prof), tp_auto.plans[-1].all_reduce_impl


@pytest.mark.inductor
@needs_deepspeed
def test_shm_all_reduce_is_exact_and_used():
    """TP=2 (one CPU per rank here): the rewritten graphs sum through the kernel (the
    profiler sees the op; the plan says so), the logits are the very bits the gloo
    all-reduce gives (a sum of two addends is the same in any order) and match one process
    to 1e-5 (the split matmuls add in another order), and greedy tokens are identical."""
    model = zoo.make_model("llama")
    with torch.no_grad():
        ref = model(_ids()).logits
    ref_tokens = model.generate(_ids()[:1, :6], max_new_tokens=8, do_sample=False)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: the kernel is not used with more ranks than CPUs")
    shm = run_distributed(_forward_and_generate, 2, "auto")
    gloo = run_distributed(_forward_and_generate, 2, "group")
    for (logits, tokens, calls, impl), (g_logits, g_tokens, g_calls, g_impl) in zip(shm, gloo):
        assert impl == "shm" and calls >= 5, (impl, calls)  # 2 per layer, 2 layers, embedding
        assert g_impl == "group" and g_calls == 0, (g_impl, g_calls)
        assert torch.equal(logits, g_logits)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(tokens, ref_tokens) and torch.equal(g_tokens, ref_tokens)


def _shm_then_auto(group=None) -> dict:
    """Compile the zoo Llama with all_reduce='shm' (the TPOptionsError's message, or None),
    then with the default 'auto' (its logits and the plan's all-reduce implementation)."""
    import tp_backend
    from tp_backend.backend import tp_auto

    group_opt = {} if group is None else {"tp_group": group}
    model = zoo.make_model("llama")
    out = {"shm": None}
    try:
        torch.compile(model, backend="tp_auto", options={**group_opt, "all_reduce": "shm"})(_ids())
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error
        while e is not None and not isinstance(e, tp_backend.TPOptionsError):
            e = getattr(e, "inner_exception", None) or e.__cause__
        out["shm"] = str(e)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend="tp_auto", options=group_opt)(_ids()).logits
    out["auto"] = (logits, tp_auto.plans[-1].all_reduce_impl)
    return out


def _subgroup(rank, world_size):
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    return None if rank == 2 else _shm_then_auto(group)


@needs_deepspeed
def test_shm_refused_for_a_group_smaller_than_the_world():
    """The kernel spans the whole world: a tp_group of 2 of 3 ranks cannot use it.
    all_reduce='shm' raises TPOptionsError on both ranks of the group, saying why and what
    to do; 'auto' falls back to gloo and stays exact (1e-5: the split matmuls' order)."""
    model = zoo.make_model("llama")
    with torch.no_grad():
        ref = model(_ids()).logits
    for out in run_distributed(_subgroup, 3)[:2]:
        assert "2 of the world's 3 ranks" in out["shm"] and "all_reduce='auto'" in out["shm"]
        logits, impl = out["auto"]
        assert impl == "group"
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def _op_sums(rank, world_size):
    import torch.distributed as dist

    from tp_backend import shm
    from tp_backend.collectives import all_reduce

    served = shm.setup(dist.group.WORLD, "auto")
    name = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(rank)
    out = []
    # 6 KiB, and 3 MiB (over the kernel's 1 MiB switch to its distributed reduce), float32
    # and float64 (not supported by the kernel: the gloo path runs).
    for numel, dtype in ((1536, torch.float32), (786432, torch.float32), (100, torch.float64)):
        x = torch.randn(numel, generator=gen, dtype=dtype)
        want = x.clone()
        dist.all_reduce(want)
        out.append((torch.equal(all_reduce(x, name, use_shm=served), want), shm.supports(x)))
    # All-gathers by the kernel (a zero buffer of the whole shape, each rank's chunks written
    # in place, summed) against the whole tensor, for every shard layout, and one of 3 MiB
    # (the kernel's distributed reduce); float64 goes through gloo.
    from tp_backend.collectives import all_gather
    from tp_backend.layers import local_shard

    whole = torch.randn(4, 12, 6, generator=torch.Generator().manual_seed(0))
    whole[0, 0, 0] = -0.0
    big = torch.randn(4, 196608, generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for t, dim, outer, blocks in [(whole, 0, 1, None), (whole, 1, 1, None),
                                      (whole, 2, 1, None), (whole, 1, 2, None),
                                      (whole, 1, 1, (6, 4, 2)), (big, 1, 1, None),
                                      (whole.double(), 1, 1, None)]:
            local = local_shard(t, dim, outer, rank, world_size, blocks)
            got = all_gather(local, dim, outer, world_size, name, blocks, rank, use_shm=served)
            out.append((torch.equal(got, t), None))
    gathers = sum(e.count for e in prof.key_averages() if e.key == "tp_backend::shm_all_gather")
    return served, out, gathers


@needs_deepspeed
def test_shm_op_sums_like_gloo():
    """The op on its own at TP=2, small and large tensors: the same bits as gloo's sum (two
    addends); float64, which the kernel does not take, goes through gloo. All-gathers by the
    kernel return the whole tensor for every shard layout and size (values equal: a -0.0
    may come back as +0.0); a float64 one goes through gloo."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    for served, out, gather_calls in run_distributed(_op_sums, 2):
        assert served and gather_calls == 6, gather_calls  # all but the float64 one
        assert out == [(True, True), (True, True), (True, False)] + [(True, None)] * 7, out


def _without_deepspeed(rank, world_size):
    import sys

    # What an install without the shm extra imports: every deepspeed module unimportable
    # (the test workers' fork server may have imported some already, tests/dist_utils.py).
    for name in [n for n in sys.modules if n.split(".")[0] == "deepspeed"] + ["deepspeed"]:
        sys.modules[name] = None
    return _shm_then_auto()


def test_without_deepspeed_auto_falls_back_and_shm_says_what_to_install():
    """No deepspeed: 'auto' runs gloo's all-reduce, exact (1e-5: the split matmuls' order);
    'shm' raises TPOptionsError on every rank naming the missing package and the extra."""
    model = zoo.make_model("llama")
    with torch.no_grad():
        ref = model(_ids()).logits
    for out in run_distributed(_without_deepspeed, 2):
        assert "deepspeed is not importable" in out["shm"] and "'.[shm]'" in out["shm"], out
        logits, impl = out["auto"]
        assert impl == "group"
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def _stale_lock(rank, world_size, extensions_dir):
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir
    out = _shm_then_auto()
    return {"shm": out["shm"], "impl": out["auto"][1]}


@needs_deepspeed
def test_stale_build_lock_falls_back_instead_of_hanging(tmp_path):
    """A build of the kernel that was killed leaves its lock file, and torch's extension
    loader would wait for it forever: an hour-old lock makes 'auto' fall back to the
    group's all-reduce and 'shm' raise, naming the lock, on every rank."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    hour_ago = os.path.getmtime(lock) - 3600
    os.utime(lock, (hour_ago, hour_ago))
    for out in run_distributed(_stale_lock, 2, str(tmp_path)):
        assert out["impl"] == "group", out
        assert out["shm"] and str(lock) in out["shm"] and "rm -r" in out["shm"], out


_LATE_LEAVER = r"""
import subprocess, sys, threading, time
from tp_backend import shm
peer = subprocess.Popen([sys.executable, "-c", "pass"]); peer.wait()  # a peer that exited
shm._KERNEL.update(peers=(peer.pid,), inflight=time.monotonic() - 2.0)  # waited 2 s already
threading.Thread(target=shm._watchdog, daemon=True).start()
time.sleep(float(sys.argv[1]))  # still "in the kernel" this long after the peer exited
shm._KERNEL["inflight"] = None  # then leaves the all-reduce
time.sleep(2.0)
"""


@pytest.mark.parametrize("stays_s, code", [(2.0, 0), (9.0, 1)])
def test_watchdog_spares_a_rank_leaving_an_all_reduce_its_peer_finished(stays_s, code):
    """A peer that finished the all-reduce first may exit (its last collective) while this
    rank's main thread is still on its way out of the kernel: the watchdog must not end a
    finished run (it did once in CI, on a loaded machine). It ends the rank only when the
    same all-reduce is still in flight 5 s after it saw the dead peer."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _LATE_LEAVER, str(stays_s)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == code, run.stderr
    assert ("exited during a shared-memory all-reduce" in run.stderr) == bool(code), run.stderr
