"""Under torch.distributed, a record equals the single-process record of the
concatenated batch (two CPU processes on gloo)."""

from __future__ import annotations

import gc
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from covshift.models import build_cnn, build_mlp
from covshift.probe import ShiftProbe

SIZES = (37, 63)  # uneven shards: the value gather must pad and trim


def make_case() -> tuple[torch.nn.Module, torch.Tensor]:
    net = build_cnn((1, 6, 6), 3, channels=(4, 5), norm="batch", seed=0)
    with torch.no_grad():
        net(torch.randn(64, 36, generator=torch.Generator().manual_seed(2)) + 1)  # running stats
    x = torch.randn(sum(SIZES), 36, generator=torch.Generator().manual_seed(1))
    return net, x


def probe_records(net: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
    probe = ShiftProbe(
        net,
        "auto",
        x,
        quantiles=(0.1, 0.5, 0.9),
        bins=16,
        unit_histograms=True,
        pooled_quantiles=True,
    )
    return {r.layer: r.stats for r in probe.record_now(0)}


def worker(rank: int, world: int, init: str, out: str, records_of: Callable[[int], Any]) -> None:
    """One rank: join the gloo group, pickle ``records_of(rank)`` to ``out.rank``."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        Path(f"{out}.{rank}").write_bytes(pickle.dumps(records_of(rank)))
        # Tear down only once both ranks are done and no DDP reducer (kept alive by
        # reference cycles until a collection) still holds the group: otherwise gloo
        # aborted a rank now and then ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, records_of: Callable[[int], Any]) -> list[Any]:
    """What ``records_of`` returned on each of two ranks."""
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "records")
    mp.spawn(worker, args=(2, init, out, records_of), nprocs=2, join=True)
    return [pickle.loads(Path(f"{out}.{rank}").read_bytes()) for rank in range(2)]


def shard_records(rank: int) -> dict[str, dict[str, np.ndarray]]:
    net, x = make_case()
    start = sum(SIZES[:rank])
    return probe_records(net, x[start : start + SIZES[rank]])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    ranks = run_two_ranks(tmp_path, shard_records)
    net, x = make_case()
    single = probe_records(net, x)
    for reduced in ranks:
        assert reduced.keys() == single.keys()
        for layer, stats in single.items():
            got = reduced[layer]
            assert got.keys() == stats.keys()
            for key, value in stats.items():
                if key in ("mean", "std", "pooled_mean", "pooled_std"):
                    np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7)
                else:  # order statistics, counts, fractions: exactly equal
                    np.testing.assert_array_equal(got[key], value, err_msg=f"{layer}/{key}")


# ------------------------------------------------------- live batches under DDP
LIVE_SHARD = 40  # equal shards: DDP's averaged gradient is the full batch's gradient


def live_records(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2
) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """``steps`` SGD steps on (x, y) with the probe recording every training forward."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    probe = ShiftProbe(model, "auto", source="train", every=1, quantiles=(0.1, 0.5, 0.9))
    with probe:
        probe.maybe_record(0)  # arms the capture of the next training forward
        for step in range(1, steps + 1):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            probe.maybe_record(step)
    # DDP prefixes the names with "module.": compare by the model's own names.
    return {(r.step, r.layer.removeprefix("module.")): r.stats for r in probe.records}


def make_live_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    net = build_mlp(36, 3, width=8, depth=2, activation="tanh", seed=0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2 * LIVE_SHARD, 36, generator=gen)
    y = torch.randint(0, 3, (2 * LIVE_SHARD,), generator=gen)
    return net, x, y


def ddp_shard_records(rank: int) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    net, x, y = make_live_case()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    shard = slice(rank * LIVE_SHARD, (rank + 1) * LIVE_SHARD)
    return live_records(ddp, x[shard], y[shard])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_live_batches_under_ddp_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    ranks = run_two_ranks(tmp_path, ddp_shard_records)
    net, x, y = make_live_case()
    single = live_records(net, x, y)
    assert {step for step, _ in single} == {0, 1}
    for reduced in ranks:
        assert reduced.keys() == single.keys()
        for (step, layer), stats in single.items():
            got = reduced[step, layer]
            assert got.keys() == stats.keys()
            for key, value in stats.items():
                if step == 0 and key not in ("mean", "std", "pooled_mean", "pooled_std"):
                    # initial weights on both sides: the very same values
                    np.testing.assert_array_equal(got[key], value, err_msg=f"{layer}/{key}")
                elif key == "hist":  # counts: bin edges move with float rounding
                    assert got[key].sum() == value.sum()
                else:  # after a DDP step: the same weights up to float rounding
                    np.testing.assert_allclose(
                        got[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{layer}/{key}"
                    )


# ------------------------------------- SyncBatchNorm before its first training batch
def sync_case() -> tuple[torch.nn.Module, torch.Tensor]:
    net = build_cnn((1, 6, 6), 3, channels=(4, 5), norm="sync_batch", seed=0)
    x = torch.randn(sum(SIZES), 36, generator=torch.Generator().manual_seed(4)) * 2 + 1
    return net, x


def untrained_sync_records(net: torch.nn.Module, x: torch.Tensor, **kw: Any) -> dict[str, Any]:
    probe = ShiftProbe(net, "auto", x, quantiles=(0.1, 0.5, 0.9), **kw)
    return {r.layer: r.stats for r in probe.record_now(0)}


def sync_shard_records(rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reduced records (SyncBatchNorm shares the batch statistics of both shards), and
    records kept on this rank (its shard's own statistics, no collective)."""
    net, x = sync_case()
    start = sum(SIZES[:rank])
    shard = x[start : start + SIZES[rank]]
    return untrained_sync_records(net, shard), untrained_sync_records(net, shard, reduce=False)


def assert_close_records(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for layer, stats in expected.items():
        assert int(got[layer]["norm_batch_stats"]) == int(stats["norm_batch_stats"]) == 2
        for key in ("mean", "std", "quantiles"):
            np.testing.assert_allclose(
                got[layer][key], stats[key], rtol=1e-5, atol=1e-5, err_msg=f"{layer}/{key}"
            )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_untrained_sync_batchnorm_is_probed_with_the_batch_statistics_training_uses(
    tmp_path: Path,
) -> None:
    ranks = run_two_ranks(tmp_path, sync_shard_records)
    net, x = sync_case()  # one process: SyncBatchNorm is BatchNorm
    whole = untrained_sync_records(net, x)
    for rank, (reduced, local) in enumerate(ranks):
        assert_close_records(reduced, whole)
        start = sum(SIZES[:rank])
        assert_close_records(local, untrained_sync_records(net, x[start : start + SIZES[rank]]))
