"""The generated datasets: ``synthetic`` (a learnable stand-in for image data) and
``linear-regression`` (Santurkar et al. 2018's ``y = A x``). Both are drawn from their
own seeded generator, so the same arguments (seed included) give the same tensors."""

from __future__ import annotations

import os

import torch

from covshift.data.dataset import Dataset
from covshift.data.registry import _register

__all__ = ["linear_regression", "synthetic"]


@_register("synthetic")
def synthetic(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 6000,
    n_test: int = 1000,
    num_features: int = 784,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """A seeded, learnable stand-in for an image dataset (for tests and quick tries).

    Each class has a random prototype in [0, 1]^D; an example is its class prototype
    blended with uniform noise, ``x = clip(0.6 * p_y + 0.4 * u, 0, 1)``, so pixel
    statistics resemble MNIST's range while the task stays learnable by an MLP.
    ``data_dir`` is ignored.
    """
    for arg, value in {"n_train": n_train, "n_test": n_test, "num_features": num_features}.items():
        if value < 1:
            raise ValueError(f"synthetic dataset: {arg} must be >= 1, got {value}")
    if num_classes < 2:
        raise ValueError(f"synthetic dataset: num_classes must be >= 2, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, num_features, generator=g)  # (K, D)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.6 * prototypes[y] + 0.4 * torch.rand(n, num_features, generator=g)
        return x.clamp_(0.0, 1.0), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    side = round(num_features**0.5)
    image_shape = (1, side, side) if side * side == num_features else None
    return Dataset(
        "synthetic",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes,
        image_shape,
        source=f"synthetic(seed={seed}, n_train={n_train}, n_test={n_test}, "
        f"num_features={num_features}, num_classes={num_classes})",
    )


@_register("linear-regression")
def linear_regression(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    dim: int = 10,
    seed: int = 0,
) -> Dataset:
    """Santurkar et al. 2018's deep-linear-network task: fit ``y = A x``.

    ``A`` is a random ``dim x dim`` matrix with N(0, 1) entries and ``x ~ N(0, I)``
    (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 2.2: a 25-layer
    deep linear network trained on ``||W_25 ... W_1 x - A x||^2``). The targets are
    real vectors, so covshift trains with the squared error summed over outputs and
    averaged over examples, and evaluations report ``test_loss`` only. The same
    ``seed`` gives the same ``A`` and examples; ``data_dir`` is ignored.
    """
    for arg, value in {"n_train": n_train, "n_test": n_test, "dim": dim}.items():
        if value < 1:
            raise ValueError(f"linear-regression dataset: {arg} must be >= 1, got {value}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g)  # (K, D)
    x_train = torch.randn(n_train, dim, generator=g)
    x_test = torch.randn(n_test, dim, generator=g)
    return Dataset(
        "linear-regression",
        x_train,
        x_train @ a.T,
        x_test,
        x_test @ a.T,
        dim,
        None,
        source=f"linear-regression(seed={seed}, n_train={n_train}, n_test={n_test}, dim={dim})",
    )
