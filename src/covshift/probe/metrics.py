"""How far a layer's input distribution moved between probe records.

The first probe summarizes each unit's distribution by a few quantiles (15/50/85 as
in Ioffe & Szegedy 2015, Fig. 1). Its drift figure, documented in docs/probe.md:

    drift = (1/U) sum_u (1/|Q|) sum_q |Q_{u,q}(T) - Q_{u,q}(0)| / w_u
    w_u   = (1/R) sum_r (Q_{u,hi}(r) - Q_{u,lo}(r))

the displacement of each unit's quantiles between the first record (``0``) and the
last (``T``), in units of the unit's typical spread ``w_u`` (its lowest-to-highest
recorded quantile width averaged over all ``R`` records), averaged over quantiles
and units. The mean over quantiles of |Q(T) - Q(0)| is a |Q|-point approximation of
the 1-Wasserstein distance between the two distributions, so drift reads as "how
many typical widths the distribution travelled". Scale-free: a layer and its
normalized version can be compared.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantile_drift", "unit_quantile_drift"]

_TINY = 1e-12


def unit_quantile_drift(quantiles: np.ndarray) -> np.ndarray:
    """Per-unit drift from records of quantiles, shape ``(R, Q, U)`` -> ``(U,)``.

    ``quantiles[r, q, u]`` is quantile ``q`` of unit ``u`` at record ``r``, the
    quantile levels increasing along ``q``. Needs at least two records and two levels.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 3 or q.shape[0] < 2 or q.shape[1] < 2:
        raise ValueError(
            f"expected quantile records of shape (records >= 2, levels >= 2, units), got {q.shape}"
        )
    width = (q[:, -1, :] - q[:, 0, :]).mean(axis=0)  # (U,)
    displacement = np.abs(q[-1] - q[0]).mean(axis=0)  # (U,)
    return displacement / np.maximum(width, _TINY)


def quantile_drift(quantiles: np.ndarray) -> float:
    """Layer drift: :func:`unit_quantile_drift` averaged over units."""
    return float(unit_quantile_drift(quantiles).mean())
