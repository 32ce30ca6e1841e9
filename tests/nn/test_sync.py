"""SyncBatchNorm: two gloo processes on CPU against one BatchNorm on the concatenated
batch; the single-process fallback; conversion there and back."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import covshift.nn as cn
from covshift.nn import SyncBatchNorm
from covshift.nn.sync import sync_batch_norm

F64 = torch.float64

# (global shape, per-rank batch sizes, momentum, affine, channels_last)
DIST_CASES = [
    ((8, 3), (5, 3), 0.1, True, False),
    ((5, 4), (1, 4), None, True, False),  # one sample on rank 0: fine, the group has 5
    ((7, 3, 4, 3), (4, 3), 0.1, True, True),
    ((6, 2, 5), (2, 4), 0.3, False, False),
]


def _reference(shape, momentum, affine, channels_last, steps, gen):
    """Inputs, output grads and what one torch BatchNorm gives on the whole batch."""
    bn = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
    ref = bn(shape[1], momentum=momentum, affine=affine, dtype=F64)
    w = torch.rand(shape[1], generator=gen, dtype=F64) + 0.5
    b = torch.randn(shape[1], generator=gen, dtype=F64)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(w), ref.bias.copy_(b)
    out = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=F64) * 3 + 2
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        g = torch.randn(shape, generator=gen, dtype=F64)
        xr = x.clone().requires_grad_(True)
        y = ref(xr)
        params = [ref.weight, ref.bias] if affine else []
        grads = torch.autograd.grad(y, [xr, *params], g, create_graph=True)
        # Double backward: d/dx of sum(dx^2) (gradient penalties, gradient ICS).
        (ggx,) = torch.autograd.grad((grads[0] ** 2).sum(), [xr])
        out.append((x, g, y.detach(), [t.detach() for t in grads], ggx))
    return ref, w, b, out


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),  # a rank that failed must not hang the other
    )
    try:
        for shape, sizes, momentum, affine, channels_last in DIST_CASES:
            gen = torch.Generator().manual_seed(0)  # the same data on every rank
            ref, w, b, steps = _reference(shape, momentum, affine, channels_last, 3, gen)
            ours = SyncBatchNorm(shape[1], momentum=momentum, affine=affine, dtype=F64)
            if affine:
                with torch.no_grad():
                    ours.weight.copy_(w), ours.bias.copy_(b)
            lo = sum(sizes[:rank])
            sl = slice(lo, lo + sizes[rank])
            for x, g, y_ref, grads_ref, ggx_ref in steps:
                xl = x[sl].clone().requires_grad_(True)
                y = ours(xl)
                torch.testing.assert_close(y, y_ref[sl])
                params = [ours.weight, ours.bias] if affine else []
                grads = torch.autograd.grad(y, [xl, *params], g[sl], create_graph=True)
                torch.testing.assert_close(grads[0], grads_ref[0][sl])
                for p_grad, p_ref in zip(grads[1:], grads_ref[1:], strict=True):
                    total = p_grad.detach().clone()  # local sums; DDP would reduce them
                    dist.all_reduce(total)
                    torch.testing.assert_close(total, p_ref)
                (ggx,) = torch.autograd.grad((grads[0] ** 2).sum(), [xl])
                torch.testing.assert_close(ggx, ggx_ref[sl])
            torch.testing.assert_close(ours.running_mean, ref.running_mean)
            torch.testing.assert_close(ours.running_var, ref.running_var)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
            ours.eval(), ref.eval()  # eval: local, with the (shared) running stats
            torch.testing.assert_close(ours(x[sl]), ref(x)[sl])
        # A group of one value per channel in total is an error on every rank.
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            SyncBatchNorm(2).train()(torch.randn(1 - rank, 2))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_batchnorm_on_the_concatenated_batch():
    # Each rank is this file run as a script (see the bottom): plain subprocesses work
    # whatever pytest's import mode, where multiprocessing's spawn must re-import
    # the test module by name.
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, str(rank), "2", init_file],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        try:
            outputs = [p.communicate(timeout=180)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


# --------------------------------------------------------------------------------------
# One process: local BatchNorm, and the custom Function itself
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_single_process_is_batchnorm(momentum, affine, track):
    assert not dist.is_initialized()
    kw = {"momentum": momentum, "affine": affine, "track_running_stats": track, "dtype": F64}
    ours, ref = SyncBatchNorm(3, **kw), nn.BatchNorm2d(3, **kw)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2, dtype=F64) + 1
        torch.testing.assert_close(ours(x), ref(x))
    if track:
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    ours.load_state_dict(ref.state_dict())  # the buffers and parameters of BatchNorm


def test_group_of_one_falls_back_to_local_batchnorm():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ours, ref = SyncBatchNorm(3, dtype=F64), nn.BatchNorm1d(3, dtype=F64)
        x = torch.randn(5, 3, 4, dtype=F64)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
        # The Function itself (its all-reduces are skipped for a group of one).
        torch.testing.assert_close(sync_batch_norm(x, None, None), ref(x))
    finally:
        dist.destroy_process_group()


def test_functional_matches_batchnorm_and_updates_running_stats():
    x = torch.randn(6, 4, 3, dtype=F64) * 2 + 5
    rm, rv = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    ref = nn.BatchNorm1d(4, momentum=0.2, dtype=F64)
    w, b = torch.rand(4, dtype=F64) + 0.5, torch.randn(4, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(w), ref.bias.copy_(b)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    wa, ba = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = sync_batch_norm(xa, rm, rv, wa, ba, momentum=0.2)
    y_ref = ref(xb)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [xa, wa, ba], g)
    want = torch.autograd.grad(y_ref, [xb, ref.weight, ref.bias], g)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(rm, ref.running_mean)
    torch.testing.assert_close(rv, ref.running_var)


def test_functional_gradcheck_and_gradgradcheck():
    # The custom Function with its closed-form backward (all-reduces are identities
    # without a process group).
    x = torch.randn(5, 3, 2, dtype=F64, requires_grad=True)
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return sync_batch_norm(x, None, None, w, b)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))
    assert gradcheck(lambda x: sync_batch_norm(x, None, None), (x,))
    assert gradgradcheck(lambda x: sync_batch_norm(x, None, None), (x,))


def test_module_gradcheck_and_gradgradcheck():
    m = SyncBatchNorm(3, dtype=F64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5), m.bias.normal_()

    def f(x, w, b):  # w, b are m's parameters (gradcheck perturbs them in place)
        return m(x)

    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    assert gradcheck(f, (x, m.weight, m.bias))
    assert gradgradcheck(f, (x, m.weight, m.bias))


def test_half_input_keeps_float32_statistics():
    x = (torch.randn(16, 3) * 0.01 + 100).to(torch.bfloat16)
    y = sync_batch_norm(x, None, None, torch.ones(3), torch.zeros(3))
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="3 channels"):
        SyncBatchNorm(3)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="eps must be > 0"):
        SyncBatchNorm(3, eps=0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync_batch_norm(torch.randn(1, 3), None, None)


# --------------------------------------------------------------------------------------
# Conversion there and back
# --------------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 5), cn.BatchNorm1d(5)),
        nn.BatchNorm1d(5, affine=False, track_running_stats=False),
    )


def test_convert_and_revert_sync_batchnorm():
    torch.manual_seed(0)
    net = _net()
    for _ in range(2):
        net(torch.randn(6, 3, 5, 5))  # non-trivial running stats
    net.eval()
    x = torch.randn(6, 3, 5, 5)
    y = net(x)
    bn_weight = net[1].weight
    synced = SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(synced[1], SyncBatchNorm) and isinstance(synced[3][2], SyncBatchNorm)
    assert isinstance(synced[4], SyncBatchNorm) and synced[4].weight is None
    assert synced[1].weight is bn_weight  # the same Parameter: optimizers keep working
    assert not synced[1].training
    torch.testing.assert_close(synced(x), y)
    back = SyncBatchNorm.revert_sync_batchnorm(synced)
    assert type(back[1]) is nn.BatchNorm2d and type(back[3][2]) is cn.BatchNorm1d
    assert type(back[4]) is nn.BatchNorm1d and back[4].running_mean is None
    assert back[1].weight is bn_weight
    torch.testing.assert_close(back(x), y)


def test_revert_without_record_needs_to_and_registry_records():
    with pytest.raises(ValueError, match=r"pass to=nn\.BatchNorm1d/2d/3d"):
        SyncBatchNorm.revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3)))
    back = SyncBatchNorm.revert_sync_batchnorm(SyncBatchNorm(3), to=nn.BatchNorm2d)
    assert type(back) is nn.BatchNorm2d
    made = cn.create_norm("sync_batch", 3, dims=3)
    assert type(SyncBatchNorm.revert_sync_batchnorm(made)) is cn.BatchNorm3d
    # torch's own SyncBatchNorm (GPU-only) is converted to ours.
    torch_sync = nn.SyncBatchNorm(3)
    ours = SyncBatchNorm.convert_sync_batchnorm(torch_sync)
    assert isinstance(ours, SyncBatchNorm) and ours.original_class is nn.SyncBatchNorm


def test_convert_sync_skips_subclasses_that_override_forward():
    class BNAct(nn.BatchNorm2d):  # timm-style BatchNorm fused with an activation
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Tagged(nn.BatchNorm2d):  # a subclass that keeps BatchNorm's forward
        pass

    net = nn.Sequential(BNAct(3), Tagged(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(net[0], BNAct) and isinstance(net[1], SyncBatchNorm)
    assert any(
        "BNAct overrides BatchNorm2d's forward; left unconverted" in str(w.message) for w in caught
    )


if __name__ == "__main__":  # one rank of the two-process test
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
