"""Grids: points, stable identities, and pairing by seed (shared weights and batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from covshift.data import BatchSampler, load_dataset
from covshift.experiments import ConfigError, expand_grid, experiment_id, load_config
from covshift.experiments.point import build_model

from .test_config import SWEEP, write


def test_grid_is_networks_by_axes_by_seeds(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SWEEP))
    points = expand_grid(config)
    assert len(points) == 2 * 3 * 2 * 3
    assert len({p.id for p in points}) == len(points)
    assert [p.position for p in points] == list(range(len(points)))
    # seed-major order: all of seed 0 first
    assert [p.seed for p in points[:12]] == [0] * 12
    first = points[0]
    assert (first.network, first.axes, first.seed) == (
        "plain",
        {"optimizer.lr": 0.05, "model.depth": 1},
        0,
    )
    assert first.spec.optimizer.lr == 0.05 and first.spec.model.depth == 1
    assert first.spec.model.norm == "none" and points[1].spec.model.norm == "batch"
    assert first.name == "plain/lr=0.05/depth=1/seed=0"


def test_identity_is_stable_and_depends_only_on_what_trains(tmp_path: Path) -> None:
    path = write(tmp_path, SWEEP)
    ids = [p.id for p in expand_grid(load_config(path))]
    assert ids == [p.id for p in expand_grid(load_config(path))]
    relabelled = load_config(
        write(tmp_path, SWEEP.replace('label = "BN"', 'label = "B"'), "b.toml")
    )
    assert [p.id for p in expand_grid(relabelled)] == ids  # labels are not identity
    assert experiment_id(relabelled) != experiment_id(load_config(path))
    other_lr = load_config(path, {"sweep.optimizer.lr": "[0.05, 0.2, 0.9]"})
    changed = [p.id for p in expand_grid(other_lr)]
    assert len(set(changed) & set(ids)) == 2 * 2 * 2 * 3  # lr 0.05 and 0.2 points are shared
    assert experiment_id(load_config(path)) == experiment_id(load_config(path))
    assert experiment_id(load_config(path)).startswith("lr-sweep-")


def test_identical_networks_are_refused(tmp_path: Path) -> None:
    text = SWEEP + '[networks.plain2]\nlabel = "plain again"\nnorm = "none"\n'
    with pytest.raises(ConfigError, match="networks 'plain' and 'plain2' train the same point"):
        expand_grid(load_config(write(tmp_path, text)))


def test_points_of_one_seed_share_initial_weights_and_batches(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SWEEP))
    data = load_dataset("synthetic", n_train=200, n_test=50)
    points = [p for p in expand_grid(config) if p.axes["model.depth"] == 2]
    by = {(p.network, p.axes["optimizer.lr"], p.seed): p for p in points}

    def weights(key: tuple) -> dict[str, torch.Tensor]:
        p = by[key]
        return {
            k: v
            for k, v in build_model(p.spec.model, data, p.seed).state_dict().items()
            if k.endswith("linear.weight") or k.startswith("head.")
        }

    # Same network and seed, another learning rate: the very same initial weights.
    for k, v in weights(("plain", 0.05, 1)).items():
        assert torch.equal(v, weights(("plain", 0.8, 1))[k]), k
    # Another network, same seed: the same Linear weights (BN only drops the bias).
    plain, bn = weights(("plain", 0.05, 1)), weights(("bn", 0.05, 1))
    for k in ("hidden.0.linear.weight", "hidden.1.linear.weight", "head.weight"):
        assert torch.equal(plain[k], bn[k]), k
    # Another seed: other weights.
    assert not torch.equal(plain["head.weight"], weights(("plain", 0.05, 2))["head.weight"])
    # The batches come from the seed alone.
    a = BatchSampler(200, 30, by[("plain", 0.05, 1)].seed)
    b = BatchSampler(200, 30, by[("bn", 0.8, 1)].seed)
    assert all(torch.equal(a.next(), b.next()) for _ in range(10))
