"""Property-based tests of the readers of user files: whatever bytes an IDX file or a
config holds, covshift returns a valid result or raises its own error (one that the
command line prints as a one-line message), never anything else."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covshift.data import IdxFormatError, read_idx
from covshift.experiments.config import ConfigError, ExperimentConfig
from covshift.experiments.config_files import load_config, read_preset
from covshift.experiments.grid import expand_grid, experiment_id

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


_IMAGES = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
_VALID = {"raw": _idx(_IMAGES), "gzip": gzip.compress(_idx(_IMAGES), mtime=0)}

# One edit of a byte string: overwrite a byte, delete a span, insert bytes, truncate.
_EDIT = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 400), st.integers(1, 16)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 400), st.just(0)),
)


def _mutate(data: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for op, where, what in edits:
        i = where % (len(out) + 1)
        if op == "set" and i < len(out):
            out[i] = what
        elif op == "delete":
            del out[i : i + what]
        elif op == "insert":
            out[i:i] = what
        elif op == "truncate":
            del out[i:]
    return bytes(out)


@FUZZ
@given(kind=st.sampled_from(sorted(_VALID)), edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_a_mutated_idx_file_reads_or_raises_an_idx_error(kind: str, edits: list) -> None:
    data = _mutate(_VALID[kind], edits)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train-images-idx3-ubyte"
        path.write_bytes(data)
        try:
            array = read_idx(path)
        except IdxFormatError as e:
            assert str(path) in str(e)  # the message names the file
            return
    assert isinstance(array, np.ndarray) and array.ndim >= 1 and array.size > 0
    if data == _VALID[kind]:
        np.testing.assert_array_equal(array, _IMAGES)


@FUZZ
@given(data=st.binary(max_size=64))
def test_random_bytes_read_or_raise_an_idx_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f"
        path.write_bytes(data)
        try:
            read_idx(path)
        except IdxFormatError:
            pass


# -- the config loader -----------------------------------------------------------------
# Keys a config may hold (most documents are then near-valid and reach deep checks),
# and keys no config holds.
_KEYS = st.sampled_from(
    [
        *("name", "title", "dataset", "seeds", "seed", "steps", "batch_size", "eval_every"),
        *("examples", "eval_examples", "test_examples", "device", "data_dir", "size"),
        *("model", "optimizer", "probe", "networks", "sweep", "claims", "sizes", "report"),
        *("divergence", "choices", "battery", "kind", "width", "depth", "norm", "activation"),
        *("norm_kwargs", "init", "init_std", "freeze", "channels", "lr", "momentum", "every"),
        *("layers", "mode", "label", "metric", "network", "baseline", "rule", "text", "set"),
        *("optimizer.lr", "model.width", "model.norm", "minutes", "factor", "stop", "eps"),
    ]
) | st.text(min_size=1, max_size=8)
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["batch", "layer", "none", "mlp", "cnn", "sigmoid", "relu", "quick", ""]),
    st.text(max_size=12),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=20,
)
_DOCUMENTS = st.fixed_dictionaries(
    {"name": st.just("fuzz"), "title": st.just("fuzz"), "dataset": st.just("synthetic")}
).flatmap(lambda base: st.dictionaries(_KEYS, _VALUES, max_size=6).map(lambda d: {**base, **d}))


def _load(text: str | bytes, overrides: dict[str, Any] | None = None) -> ExperimentConfig | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        try:
            config = load_config(str(path), overrides)
            expand_grid(config)
        except ConfigError as e:
            assert str(e)  # a message, printed whole by the command line
            return None
    experiment_id(config)
    return config


@FUZZ
@given(document=_DOCUMENTS)
def test_a_random_config_loads_or_raises_a_config_error(document: dict[str, Any]) -> None:
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        return  # not expressible as TOML (e.g. a key TOML cannot write)
    _load(text)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_a_config_raise_a_config_error(data: bytes) -> None:
    _load(b'name = "x"\ntitle = "x"\n' + data)


@FUZZ
@given(
    key=_KEYS.map(lambda k: k if "." in k else f"model.{k}") | _KEYS,
    value=st.text(max_size=20),
)
def test_a_random_override_applies_or_raises_a_config_error(key: str, value: str) -> None:
    base = 'name = "x"\ntitle = "x"\ndataset = "synthetic"\n[model]\nwidth = 8\n'
    _load(base, {key: value})


def _leaves(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths (keys and list indices) of every value in a TOML tree, tables included."""
    out = [path] if path else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _leaves(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _leaves(v, (*path, i))
    return out


def _replaced(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, head: _replaced(tree[head], rest, value)}
    return [_replaced(v, rest, value) if i == head else v for i, v in enumerate(tree)]


_PRESETS = {
    name: read_preset(name)[1]
    for name in ("ioffe2015", "shift-causes", "norm-scopes", "santurkar2018", "lr-sensitivity")
}


@FUZZ
@given(
    name=st.sampled_from(sorted(_PRESETS)),
    where=st.integers(0, 10**6),
    value=_VALUES,
    size=st.sampled_from([None, "quick", "full"]),
)
def test_a_preset_with_one_value_changed_loads_or_raises_a_config_error(
    name: str, where: int, value: Any, size: str | None
) -> None:
    """Near-valid documents: a shipped preset with one value (a scalar, a table, a list
    item, a claim) replaced by a random one, so the deep checks run."""
    raw = _PRESETS[name]
    paths = _leaves(raw)
    document = {**_replaced(raw, paths[where % len(paths)], value), "dataset": "synthetic"}
    document.pop("data_dir", None)
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.toml"
        path.write_text(text)
        try:
            config = load_config(str(path), size=size)
            expand_grid(config)
        except ConfigError as e:
            assert str(e)
            return
    experiment_id(config)
