"""Shared fixtures: small synthetic data and a temporary store."""

from __future__ import annotations

from pathlib import Path

import pytest

from covshift.data import Dataset, load_dataset
from covshift.store import Store


@pytest.fixture(scope="session")
def small_data() -> Dataset:
    """A small synthetic 28x28, 10-class dataset (seeded)."""
    return load_dataset("synthetic", n_train=1200, n_test=300, seed=3)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "covshift.db") as s:
        yield s
