"""Under torch.distributed, a record equals the single-process record of the
concatenated batch (two CPU processes on gloo)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from covshift.models import build_cnn
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


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net, x = make_case()
        start = sum(SIZES[:rank])
        shard = x[start : start + SIZES[rank]]
        records = probe_records(net, shard)
        Path(f"{out}.{rank}").write_bytes(pickle.dumps(records))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "records")
    mp.spawn(worker, args=(2, init, out), nprocs=2, join=True)
    net, x = make_case()
    single = probe_records(net, x)
    for rank in range(2):
        reduced = pickle.loads(Path(f"{out}.{rank}").read_bytes())
        assert reduced.keys() == single.keys()
        for layer, stats in single.items():
            got = reduced[layer]
            assert got.keys() == stats.keys()
            for key, value in stats.items():
                if key in ("mean", "std", "pooled_mean", "pooled_std"):
                    np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7)
                else:  # order statistics, counts, fractions: exactly equal
                    np.testing.assert_array_equal(got[key], value, err_msg=f"{layer}/{key}")
