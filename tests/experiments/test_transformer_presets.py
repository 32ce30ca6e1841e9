"""The transformer presets end to end, cut down to a few steps on the synthetic text:
every claim judged (an estimate or a reason), gradient norms at init and the
fluctuation of BatchNorm's statistics read from the store into the claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covshift.experiments.config_files import load_config

from .helpers import covshift

TINY = ["--dataset", "synthetic-text", "--set", "test_examples=32", "-q", "--json"]


def _claims(tmp_path: Path, preset: str, *args: str) -> list[dict]:
    done = covshift("run", preset, *TINY, *args, "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["claims"]


@pytest.mark.slow
def test_norm_placement_reads_the_gradients_at_init(tmp_path: Path) -> None:
    claims = _claims(
        tmp_path, "norm-placement", "--seeds", "2", "--steps", "4", "--eval-every", "2",
        "--set", "probe.every=4",
    )  # fmt: skip
    by = {(c["id"], c["slice_text"]): c for c in claims}
    for init in ("gpt2", "unit"):
        grad = by[("post-larger-gradients-at-output", f"init={init}")]
        assert len(grad["per_seed"]) == 2 and grad["verdict"] in (
            "supported", "contradicted", "inconclusive"
        )  # fmt: skip
        trend = by[("post-gradients-grow-towards-output", f"init={init}")]
        assert trend["data"]["0"]["layers"] == [f"blocks.{i}.mlp.c_proj" for i in range(6)]
        # 4 steps train nothing: no threshold on the grid, censored below
        gap = by[("post-lower-max-lr", f"init={init}")]
        assert gap["verdict"] != "supported"
    for claim in claims:
        assert claim["verdict"] and (claim["estimate"] is not None or claim["reason"])


@pytest.mark.slow
def test_transformer_norms_measures_batchnorms_statistics(tmp_path: Path) -> None:
    claims = _claims(
        tmp_path, "transformer-norms", "--seeds", "2", "--steps", "4", "--eval-every", "2",
        "--set", "probe.every=2", "--set", "probe.batch_stats_every=2",
    )  # fmt: skip
    fluct = [c for c in claims if c["id"] == "bn-statistics-fluctuate"]
    assert [c["slice_text"] for c in fluct] == ["depth=2", "depth=6"]
    for c in fluct:
        assert len(c["per_seed"]) == 2 and all(v > 0 for v in c["per_seed"].values())
    # DyT's second positive control: alpha0 0.5 under the unit-scale init, a check
    unit = [c for c in claims if c["id"] == "dyt-trains-unit-init"]
    assert [(c["slice_text"], c["kind"], c["network"]) for c in unit] == [
        ("depth=2", "check", "dyt_unit"), ("depth=6", "check", "dyt_unit")
    ]  # fmt: skip
    dyt = [c for c in claims if c["id"] == "dyt-like-layer"]
    assert all("dyt-trains-unit-init" in c["controls"] for c in dyt)
    for claim in claims:
        assert claim["verdict"] and (claim["estimate"] is not None or claim["reason"])


@pytest.mark.parametrize("size", ["quick", "full"])
def test_norm_placements_grid_checks_read_the_grids_ends(size: str) -> None:
    # The full grid adds lr 0.001 below the quick one: a check that named 0.003 read
    # the middle of the full grid, where post-norm does not train (seed 0: 4.46 bits
    # per byte), and failed for that reason alone.
    config = load_config("norm-placement", None, size=size)
    rates = sorted(config.sweep["optimizer.lr"])
    where = {c.id: c.where["optimizer.lr"] for c in config.claims if c.id.startswith("grid-")}
    assert where == {"grid-top-pre": rates[-1], "grid-bottom-post": rates[0]}
    assert rates[0] == {"quick": 0.003, "full": 0.001}[size]
