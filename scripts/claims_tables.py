#!/usr/bin/env python
"""Markdown tables of a battery's ``claims.json``, in the format of docs/claims.md.

``covshift claims`` writes ``claims.json`` (:func:`covshift.report.battery_page.write_battery`):
a ``claims`` list with one object per result (:class:`covshift.experiments.claim_result.
ClaimResult`). This tool turns it into the markdown of docs/claims.md's section "Every
result", so that a docs update is generated rather than copied by hand:

- ``claims_tables.py CLAIMS.json``: per preset, in the order the file first names it,
  a ``#### `preset``` heading and the table ``claim | kind | estimate | 95% interval | p
  | p (Holm) | verdict | unadjusted``;
- ``--against OTHER.json``: one table matching each result of either file (by preset,
  claim id and slice), both estimates, intervals and adjusted verdicts, the rows whose
  verdict changed marked, and a count;
- ``--summary``: per preset, how many hypotheses have each verdict and how many checks
  passed or failed, with the totals.

Older files lack fields: before checks existed every claim was judged as a hypothesis
(no ``kind``), before the battery adjusted p-values there were none, and the battery's
own claim had no ``preset`` (its ``experiment`` names it). A missing optional field
is written "–"; a missing required one (``claims``, a result's ``id``, ``verdict``,
``preset``/``experiment``) is an error that names the file and the field.

Run from the repository root: ``python scripts/claims_tables.py REPORT/claims.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covshift.experiments.claim_result import verdict_p_adjusted
from covshift.experiments.scale_check import scales_disagree

DASH = "–"
TABLE_HEAD = (
    "| claim | kind | estimate | 95% interval | p | p (Holm) | verdict | unadjusted |\n"
    "|---|---|---|---|---|---|---|---|"
)
# Verdicts written in bold: the decisive ones (docs/claims.md's convention).
BOLD = {"supported", "contradicted", "pass", "fail"}
HYPOTHESIS_VERDICTS = (
    "supported",
    "inconclusive",
    "contradicted",
    "not interpretable",
    "not measurable",
    "not measured",
)
CHECK_VERDICTS = ("pass", "fail", "not measured")
KINDS = ("hypothesis", "check")


class ClaimsFileError(ValueError):
    """A file that is not a readable ``claims.json``; the message names file and field."""


Result = dict[str, Any]


def load_results(path: Path) -> list[Result]:
    """The results of ``path``'s ``claims`` list, each with ``preset`` and ``kind`` set.

    ``preset`` falls back to the file's own top-level ``preset`` (one experiment's
    claims.json) and then to ``experiment`` (older files name the battery's own claim
    only there); ``kind`` falls back to ``"hypothesis"`` (files written before checks
    existed judged every claim as one). Raises :class:`ClaimsFileError` naming the file
    and the field when a required field is missing or two results share one key.
    """
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClaimsFileError(f"{path}: cannot read it as JSON ({exc})") from exc
    claims = payload.get("claims") if isinstance(payload, dict) else None
    if not isinstance(claims, list):
        raise ClaimsFileError(
            f"{path}: not a claims.json (no 'claims' list at the top level; "
            "`covshift claims` writes one into its report folder)"
        )
    results: list[Result] = []
    seen: set[tuple[str, str, str]] = set()
    for i, raw in enumerate(claims):
        if not isinstance(raw, dict):
            raise ClaimsFileError(f"{path}: claims[{i}] is not an object")
        for name in ("id", "verdict"):
            if not isinstance(raw.get(name), str):
                raise ClaimsFileError(f"{path}: claims[{i}] has no string field '{name}'")
        # one experiment's claims.json (``covshift run``'s) names its preset once, at
        # the top level
        preset = raw.get("preset") or payload.get("preset") or raw.get("experiment")
        if not isinstance(preset, str):
            raise ClaimsFileError(f"{path}: claims[{i}] ({raw['id']}) has no 'preset' field")
        kind = raw.get("kind") or "hypothesis"
        if kind not in KINDS:
            raise ClaimsFileError(
                f"{path}: claims[{i}] ({raw['id']}) has 'kind' {kind!r}, not one of {KINDS}"
            )
        interval = raw.get("interval")
        if interval is not None and not (isinstance(interval, list) and len(interval) == 2):
            raise ClaimsFileError(
                f"{path}: claims[{i}] ({raw['id']}) has 'interval' {interval!r}, "
                "not [low, high] or null"
            )
        result = {**raw, "preset": preset, "kind": kind}
        key = result_key(result)
        if key in seen:
            raise ClaimsFileError(f"{path}: claims[{i}] repeats {key} (preset, id, slice)")
        seen.add(key)
        results.append(result)
    return results


def slice_label(result: Result) -> str:
    """The slice's text (``lr=0.01``), or its settings where an older file lacks it."""
    text = result.get("slice_text")
    if isinstance(text, str):
        return text
    settings = result.get("slice") or {}
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))


def result_key(result: Result) -> tuple[str, str, str]:
    """What identifies a result across files: preset, claim id and slice."""
    return result["preset"], result["id"], slice_label(result)


def claim_label(result: Result) -> str:
    """```id``` followed by the slice in parentheses, as docs/claims.md writes it."""
    where = slice_label(result)
    return f"`{result['id']}`" + (f" ({_cell(where)})" if where else "")


def _cell(text: str) -> str:
    # A pipe would end the markdown cell.
    return text.replace("|", "\\|")


def fmt_value(value: float | None) -> str:
    """Signed, three significant digits (``+0.848``, ``-6.04e-05``); "–" if missing."""
    return DASH if value is None else f"{value:+.3g}"


def fmt_interval(interval: Sequence[float | None] | None) -> str:
    """``[lo, hi]``; a missing side is open (censored): ``-inf`` / ``+inf``.

    No interval at all (or both sides missing) is "–": nothing is known of it.
    """
    if not interval or all(side is None for side in interval):
        return DASH
    lo, hi = interval
    low = "-inf" if lo is None else fmt_value(lo)
    high = "+inf" if hi is None else fmt_value(hi)
    return f"[{low}, {high}]"


def fmt_p(p: float | None) -> str:
    """Two significant digits; below 1e-4 in exponent form (``5.9e-05``)."""
    if p is None:
        return DASH
    return f"{p:.1e}" if 0 < p < 1e-4 else f"{p:.2g}"


def verdict_cell(result: Result) -> str:
    """The verdict, bold where decisive, with the units left out as degenerate."""
    verdict = result["verdict"]
    text = f"**{verdict}**" if verdict in BOLD else verdict
    excluded, units = result.get("excluded_units"), result.get("units")
    if excluded and units:
        text += f" ({excluded}/{units} units excluded)"
    if scales_disagree(result):
        own, other = result["verdict_own_scale"], result["other_scale"]
        scale = other["metric"].split("/")[0]
        text += f" (scales disagree: {own} here, {other['verdict']} in {scale})"
    return text


def result_row(result: Result) -> str:
    """One row of the "Every result" table."""
    check = result["kind"] == "check"
    unadjusted = "" if check else result.get("verdict_unadjusted") or DASH
    cells = [
        claim_label(result),
        result["kind"],
        fmt_value(result.get("estimate")),
        fmt_interval(result.get("interval")),
        fmt_p(result.get("p_value")),
        DASH if check else fmt_p(verdict_p_adjusted(result)),
        verdict_cell(result),
        unadjusted,
    ]
    return "| " + " | ".join(cells) + " |"


def by_preset(results: Sequence[Result]) -> dict[str, list[Result]]:
    """Results grouped by preset, presets in the order the file first names them."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result["preset"], []).append(result)
    return groups


def tables(results: Sequence[Result]) -> str:
    """Per preset a ``#### `preset``` heading and its table."""
    parts = [
        f"#### `{preset}`\n\n{TABLE_HEAD}\n" + "\n".join(result_row(r) for r in rows)
        for preset, rows in by_preset(results).items()
    ]
    return "\n\n".join(parts) + "\n"


def comparison(a: Sequence[Result], b: Sequence[Result], names: tuple[str, str]) -> str:
    """Both files' results side by side, verdict changes marked, and the counts.

    Rows follow ``a``'s order, preset by preset; a result only in ``b`` follows its
    preset's rows (or, for a preset only in ``b``, comes at the end).
    """
    in_a = {result_key(r): r for r in a}
    in_b = {result_key(r): r for r in b}
    order: dict[str, list[tuple[str, str, str]]] = {}
    for key in [*in_a, *in_b]:
        if key not in order.get(key[0], []):
            order.setdefault(key[0], []).append(key)
    lines = [
        f"A: `{names[0]}`; B: `{names[1]}`. Verdicts are the adjusted ones.",
        "",
        "| preset | claim | kind | estimate A | 95% interval A | verdict A | estimate B "
        "| 95% interval B | verdict B | changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    differ = both = only = 0
    for keys in order.values():
        for key in keys:
            ra, rb = in_a.get(key), in_b.get(key)
            if ra is not None and rb is not None:
                both += 1
                changed = ra["verdict"] != rb["verdict"]
                differ += changed
                mark = "**changed**" if changed else ""
            else:
                only += 1
                mark = "only in A" if rb is None else "only in B"
            present = [r for r in (ra, rb) if r is not None]
            kinds = dict.fromkeys(r["kind"] for r in present)
            cells = [f"`{key[0]}`", claim_label(present[0]), " → ".join(kinds)]
            for r in (ra, rb):
                cells += (
                    [fmt_value(r.get("estimate")), fmt_interval(r.get("interval")), verdict_cell(r)]
                    if r is not None
                    else [DASH, DASH, DASH]
                )
            lines.append("| " + " | ".join([*cells, mark]) + " |")
    lines += ["", f"{differ} of {both} verdicts differ; {only} results only in one file"]
    return "\n".join(lines) + "\n"


def summary(results: Sequence[Result]) -> str:
    """Per preset and in total: hypotheses per verdict, checks per result."""
    columns = [("hypothesis", v) for v in HYPOTHESIS_VERDICTS]
    columns += [("check", v) for v in CHECK_VERDICTS]
    # A verdict this tool does not know gets a column of its own, never folded in.
    columns += dict.fromkeys(
        (r["kind"], r["verdict"]) for r in results if (r["kind"], r["verdict"]) not in columns
    )
    head = [verdict if kind == "hypothesis" else f"checks {verdict}" for kind, verdict in columns]
    lines = ["| preset | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for preset, rows in {**by_preset(results), "**total**": list(results)}.items():
        counts = [sum((r["kind"], r["verdict"]) == column for r in rows) for column in columns]
        name = preset if preset == "**total**" else f"`{preset}`"
        lines.append("| " + " | ".join([name, *map(str, counts)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the requested markdown; 2 with a message on a file that cannot be read."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claims", type=Path, help="a battery's claims.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--against", type=Path, help="a second claims.json to compare with")
    mode.add_argument("--summary", action="store_true", help="count the verdicts per preset")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.claims)
        other = load_results(args.against) if args.against else None
    except ClaimsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if other is not None:
        sys.stdout.write(comparison(results, other, (str(args.claims), str(args.against))))
    elif args.summary:
        sys.stdout.write(summary(results))
    else:
        sys.stdout.write(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
