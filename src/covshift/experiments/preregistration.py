"""The pre-registration record: a preset's claims and rules, hashed, and when the store
first saw them.

A claim's verdict is only as good as the promise that its rule was written before its
numbers were seen. Every experiment the store records keeps its whole configuration,
claims included, with the time it was recorded (before any of its points ran), so
the store itself is the register:

- ``hash``: SHA-256 (first 16 hex digits) of the preset's claims as JSON (every field
  of every claim, in order, keys sorted, an axis end as written: ``"largest"``): any
  change of a claim, its rule, value, margin, metric or kind changes it; the sizes,
  seeds and steps do not;
- ``first_recorded``: the earliest time an experiment of this preset with this hash
  was recorded in the store;
- ``changes``: every earlier version of the preset's claims (another hash, recorded
  before this one) for which results existed (a point of that experiment has a
  finished or diverged run), with the claims that differ, old and new. A rule changed
  after results existed is shown as changed; docs/claims.md lists each such change
  with its date and reason.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from covshift.experiments.config import ExperimentConfig
from covshift.store import Store

__all__ = ["claims_hash", "preregistration"]


def _claims_json(claims: list[dict[str, Any]]) -> str:
    return json.dumps(claims, sort_keys=True, separators=(",", ":"))


def _as_written(claim: dict[str, Any]) -> dict[str, Any]:
    """A claim as its preset writes it: an axis end resolved when the configuration
    was read (``where = { examples = "largest" }``, 180000 at one size and 9600 at
    another) goes back to its name, so that a size does not look like a new rule."""
    claim = dict(claim)
    for path, end in (claim.pop("axis_ends", None) or {}).items():
        field, _, key = path.partition(".")
        table = claim.get(field)
        if isinstance(table, dict) and key in table:
            claim[field] = {**table, key: end}
    return claim


def _dump(config: ExperimentConfig) -> list[dict[str, Any]]:
    return [_as_written(c.model_dump(mode="json")) for c in config.claims]


def claims_hash(claims: list[dict[str, Any]] | ExperimentConfig) -> str:
    """The hash of a preset's claims (module docstring)."""
    dumped = _dump(claims) if isinstance(claims, ExperimentConfig) else claims
    return hashlib.sha256(_claims_json(dumped).encode()).hexdigest()[:16]


def _normalized(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored claims as the current schema reads them (fields added since get their
    defaults), so that a version differs only where a claim really changed."""
    from covshift.experiments.claim_spec import ClaimSpec

    out = []
    for claim in raw:
        try:
            out.append(_as_written(ClaimSpec.model_validate(claim).model_dump(mode="json")))
        except ValueError:
            out.append(claim)  # a claim this version cannot read: kept as stored
    return out


def _has_results(store: Store, experiment_id: str) -> bool:
    points = [p.point for p in store.experiment_points(experiment_id)]
    runs = store.runs_of_points(points)
    return any(r.status in ("finished", "diverged") for r in runs.values())


def _differences(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def by_id(claims: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {c.get("id") or f"claim-{i + 1}": c for i, c in enumerate(claims)}

    before, after = by_id(old), by_id(new)
    out = []
    for key in [*before, *(k for k in after if k not in before)]:
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        fields = sorted({*(a or {}), *(b or {})})
        changed = [f for f in fields if (a or {}).get(f) != (b or {}).get(f)]
        out.append(
            {
                "id": key,
                "fields": changed if a and b else ["added" if b else "removed"],
                "before": {f: a.get(f) for f in changed} if a else None,
                "after": {f: b.get(f) for f in changed} if b else None,
            }
        )
    return out


def preregistration(store: Store, config: ExperimentConfig) -> dict[str, Any]:
    """The pre-registration record of ``config``'s preset in ``store``."""
    current = _dump(config)
    digest = claims_hash(current)
    versions: dict[str, dict[str, Any]] = {}
    # Oldest first. Versions are ordered by when the store first saw them, as a
    # position: timestamps have one-second resolution, and two versions recorded
    # within one second must still come one before the other.
    for experiment_id, name, created_at in reversed(store.experiments()):
        if name != config.name:
            continue
        raw = (store.experiment_config(experiment_id) or {}).get("claims", [])
        claims = _normalized(list(raw))
        h = claims_hash(claims)
        version = versions.setdefault(
            h,
            {
                "hash": h,
                "first_recorded": created_at,
                "order": len(versions),
                "claims": claims,
                "results": False,
            },
        )
        version["results"] = version["results"] or _has_results(store, experiment_id)
    mine = versions.get(digest)
    first = mine["first_recorded"] if mine else None
    position = mine["order"] if mine else len(versions)
    changes = [
        {
            "hash": v["hash"],
            "first_recorded": v["first_recorded"],
            "differences": _differences(v["claims"], current),
        }
        for h, v in versions.items()
        if h != digest and v["results"] and v["order"] < position
    ]
    return {
        "preset": config.name,
        "hash": digest,
        "first_recorded": first,
        "claims": len(current),
        "changes": changes,
    }
