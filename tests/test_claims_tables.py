"""scripts/claims_tables.py: the markdown of docs/claims.md from a claims.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "claims_tables.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("claims_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


claims_tables = _load_script()


def _result(preset: str, id_: str, kind: str, verdict: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "preset": preset,
        "id": id_,
        "kind": kind,
        "slice": {},
        "slice_text": "",
        "estimate": None,
        "interval": None,
        "p_value": None,
        "p_adjusted": None,
        "p_adjusted_contradict": None,
        "verdict": verdict,
        "verdict_unadjusted": "supported" if kind == "check" else verdict,
        "excluded_units": None,
        "units": None,
    }
    return {**base, **fields}


def _quick() -> dict[str, Any]:
    return {
        "size": "quick",
        "claims": [
            _result(
                "alpha",
                "drift-visible",
                "check",
                "pass",
                slice={"optimizer.lr": 0.1},
                slice_text="lr=0.1",
                estimate=0.31278,
                interval=[0.28791, 0.33766],
                p_value=0.00017071,
                excluded_units=14,
                units=384,
            ),
            _result(
                "alpha",
                "bn-faster",
                "hypothesis",
                "contradicted",
                estimate=1.3352,
                interval=[1.2931, 1.3773],
                p_value=0.99999,
                p_adjusted=1.0,
                p_adjusted_contradict=0.0031,
            ),
            _result(
                "beta",
                "slower-without-bn",
                "hypothesis",
                "inconclusive",
                slice={"depth": 4},
                slice_text="depth=4",
                estimate=1916.7,
                interval=[1310.2, None],
                p_value=9.9995e-05,
                p_adjusted=0.11,
                p_adjusted_contradict=1.0,
                verdict_unadjusted="supported",
            ),
            _result("beta", "shift-vs-speed", "hypothesis", "not measured"),
        ],
    }


def _write(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_tables_write_the_rows_of_docs_claims_md(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "claims.json", _quick())
    assert claims_tables.main([str(path)]) == 0
    head = (
        "| claim | kind | estimate | 95% interval | p | p (Holm) | verdict | unadjusted |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    assert capsys.readouterr().out == (
        "#### `alpha`\n\n" + head + "| `drift-visible` (lr=0.1) | check | +0.313 | "
        "[+0.288, +0.338] | 0.00017 | – | **pass** (14/384 units excluded) |  |\n"
        "| `bn-faster` | hypothesis | +1.34 | [+1.29, +1.38] | 1 | 0.0031 | "
        "**contradicted** | contradicted |\n"
        "\n#### `beta`\n\n" + head + "| `slower-without-bn` (depth=4) | hypothesis | "
        "+1.92e+03 | [+1.31e+03, +inf] | 1.0e-04 | 0.11 | inconclusive | supported |\n"
        "| `shift-vs-speed` | hypothesis | – | – | – | – | not measured | not measured |\n"
    )


def test_comparison_marks_changed_verdicts_and_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = _write(tmp_path / "quick.json", _quick())
    full_payload = _quick()
    claims = full_payload["claims"]
    claims[1].update(verdict="inconclusive", estimate=0.5, interval=[-0.1, 1.1])
    del claims[3]  # not in the full run
    claims.append(_result("gamma", "ghost-small-hurts", "check", "fail", estimate=-0.25))
    full = _write(tmp_path / "full.json", full_payload)
    assert claims_tables.main([str(quick), "--against", str(full)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    assert rows == [
        "| `alpha` | `drift-visible` (lr=0.1) | check | +0.313 | [+0.288, +0.338] | "
        "**pass** (14/384 units excluded) | +0.313 | [+0.288, +0.338] | "
        "**pass** (14/384 units excluded) |  |",
        "| `alpha` | `bn-faster` | hypothesis | +1.34 | [+1.29, +1.38] | **contradicted** | "
        "+0.5 | [-0.1, +1.1] | inconclusive | **changed** |",
        "| `beta` | `slower-without-bn` (depth=4) | hypothesis | +1.92e+03 | "
        "[+1.31e+03, +inf] | inconclusive | +1.92e+03 | [+1.31e+03, +inf] | inconclusive |  |",
        "| `beta` | `shift-vs-speed` | hypothesis | – | – | not measured | – | – | – | only in A |",
        "| `gamma` | `ghost-small-hurts` | check | – | – | – | -0.25 | – | **fail** | only in B |",
    ]
    assert lines[-1] == "1 of 3 verdicts differ; 2 results only in one file"


def test_summary_counts_verdicts_per_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "claims.json", _quick())
    assert claims_tables.main([str(path), "--summary"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| preset | supported | inconclusive | contradicted | not interpretable | "
        "not measurable | not measured | checks pass | checks fail | checks not measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| `alpha` | 0 | 0 | 1 | 0 | 0 | 0 | 1 | 0 | 0 |",
        "| `beta` | 0 | 1 | 0 | 0 | 0 | 1 | 0 | 0 | 0 |",
        "| **total** | 0 | 1 | 1 | 0 | 0 | 1 | 1 | 0 | 0 |",
    ]


def test_older_file_without_kind_or_p_values_reads_as_hypotheses(tmp_path: Path) -> None:
    older = {
        "claims": [
            {
                "experiment": "battery",
                "id": "shift-vs-speed",
                "slice": {},
                "slice_text": "",
                "estimate": 0.559,
                "interval": [0.43, 0.688],
                "verdict": "supported",
            }
        ]
    }
    results = claims_tables.load_results(_write(tmp_path / "old.json", older))
    assert claims_tables.result_row(results[0]) == (
        "| `shift-vs-speed` | hypothesis | +0.559 | [+0.43, +0.688] | – | – | **supported** | – |"
    )


def test_a_file_that_is_not_a_claims_json_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = _write(tmp_path / "summary.json", {"points": []})
    assert claims_tables.main([str(summary)]) == 2
    err = capsys.readouterr().err
    assert str(summary) in err and "no 'claims' list" in err
    no_verdict = _quick()
    del no_verdict["claims"][2]["verdict"]
    broken = _write(tmp_path / "broken.json", no_verdict)
    with pytest.raises(
        claims_tables.ClaimsFileError, match=r"broken\.json: claims\[2\].*'verdict'"
    ):
        claims_tables.load_results(broken)
    one_sided = _quick()
    one_sided["claims"][0]["interval"] = [0.1]
    short = _write(tmp_path / "short.json", one_sided)
    with pytest.raises(
        claims_tables.ClaimsFileError, match=r"short\.json: claims\[0\].*'interval'"
    ):
        claims_tables.load_results(short)
