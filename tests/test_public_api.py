"""The public surface: what ``__all__`` and the package docstring promise can be imported."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import covshift


def _modules() -> list[str]:
    """Every module of covshift (``__main__`` runs the CLI when imported: left out)."""
    found = pkgutil.walk_packages(covshift.__path__, prefix="covshift.")
    return sorted(m.name for m in found if not m.name.endswith("__main__"))


def test_every_top_level_name_imports() -> None:
    namespace: dict[str, object] = {}
    exec("from covshift import *", namespace)
    assert set(covshift.__all__) <= set(namespace)
    for name in covshift.__all__:
        value = getattr(covshift, name)
        if name != "__version__":  # the object its defining module holds, not a copy
            source = sys.modules[value.__module__]
            assert getattr(source, name) is value, name


def test_internals_stay_out_of_the_top_level_api() -> None:
    for name in covshift.__all__:
        assert not name.startswith("_") or name == "__version__", name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        covshift.nope  # noqa: B018


def test_the_docstring_example_imports() -> None:
    lines = [
        line.strip()
        for line in (covshift.__doc__ or "").splitlines()
        if line.strip().startswith(("from covshift", "import covshift"))
    ]
    assert lines, "the package docstring shows how to import the API"
    for line in lines:
        exec(line, {})


def test_train_is_the_function_and_its_module_is_training() -> None:
    # The loop lives in covshift.training: no module named like the function, so
    # importing the module leaves the package's attribute ``train`` the function.
    importlib.import_module("covshift.training")
    import covshift as package
    from covshift import TrainConfig, train

    assert inspect.isfunction(train) and train.__module__ == "covshift.training"
    assert package.train is train and inspect.isfunction(package.train)
    assert sys.modules["covshift.training"].TrainConfig is TrainConfig
    assert "covshift.train" not in sys.modules


@pytest.mark.parametrize("module", _modules())
def test_every_name_in_a_modules_all_imports(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", ()):
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it lacks"
        dunder = name.startswith("__") and name.endswith("__")
        assert dunder or not name.startswith("_"), f"{module}.__all__ exports internal {name}"


def test_importing_covshift_loads_neither_torch_nor_numpy() -> None:
    # The top-level names are imported on first use; the package itself stays cheap.
    code = "import sys, covshift; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
