"""The sweep's outputs: claims.json, claims.html, points.csv, summary.json and the
experiment page, consistent with each other and with the store."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from covshift.experiments import load_config, run_experiment, stored_config, summarize
from covshift.experiments.backends import InlineBackend
from covshift.report import write_report
from covshift.store import Store

from .helpers import SMALL_SWEEP, covshift, sweep_file


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("report")
    text = (
        SMALL_SWEEP.replace("seeds = 3", "seeds = 2")
        + """
[[claims]]
id = "lr-trend"
text = "BN's accuracy does not fall with the learning rate"
statistic = "trend"
metric = "test_accuracy/final"
network = "bn"
axis = "optimizer.lr"
rule = "not_less"
margin = 0.5
"""
    )
    config = load_config(str(sweep_file(tmp, text)))
    store = Store(tmp / "c.db")
    result = run_experiment(config, store, backend=InlineBackend(threads=1))
    summary = summarize(store, result.experiment_id, config)
    index = write_report(store, result.experiment_id, config, summary, tmp / "rep")
    yield store, config, result.experiment_id, summary, index.parent
    store.close()


def test_claims_json_is_strict_and_matches_the_summary(reported) -> None:
    _store, _config, experiment, summary, out = reported
    payload = json.loads((out / "claims.json").read_text())
    assert payload["experiment"] == experiment and payload["seeds"] == [0, 1]
    assert "Student t" in payload["interval_method"]
    claims = payload["claims"]
    assert len(claims) == 3 + 1  # the difference per learning rate, and the trend
    for c, s in zip(claims, summary["claims"], strict=True):
        assert (c["estimate"], c["interval"], c["verdict"]) == (
            s["estimate"],
            s["interval"],
            s["verdict"],
        )
        assert (out / c["figure"]).is_file() and c["rule_text"].startswith("supported if")
    # The estimate is the mean of the per-seed values, which come from the points.
    by_point = {(p["network"], p["axes"]["optimizer.lr"], p["seed"]): p for p in summary["points"]}
    for c in claims[:3]:
        lr = c["slice"]["optimizer.lr"]
        diffs = [
            by_point[("bn", lr, s)]["test_accuracy"]["final"]
            - by_point[("plain", lr, s)]["test_accuracy"]["final"]
            for s in (0, 1)
        ]
        assert list(c["per_seed"].values()) == pytest.approx(diffs)
        assert c["data"]["0"]["network"] == by_point[("bn", lr, 0)]["test_accuracy"]["final"]
    assert "NaN" not in (out / "claims.json").read_text()
    json.loads((out / "summary.json").read_text())  # strict JSON as well


def test_claims_html_is_self_contained(reported) -> None:
    *_, out = reported
    page = (out / "claims.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    for text in ("95% interval", "rule (fixed in the preset)", "lr-trend", "Spearman"):
        assert text in page
    index = (out / "index.html").read_text()
    assert 'href="claims.html#claim-1-lr=0.1"' in index and "points.csv" in index


def test_points_csv_has_a_row_per_point_and_the_axes_as_columns(reported) -> None:
    store, _, _, _summary, out = reported
    with (out / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert {
        "point",
        "network",
        "seed",
        "optimizer.lr",
        "status",
        "test_accuracy_final",
        "drift_hidden.2.act",
    } <= set(rows[0])
    runs = store.runs_of_points([r["point"] for r in rows])
    for row in rows:
        _, acc = store.scalars(runs[row["point"]].id, "test_accuracy")
        assert float(row["test_accuracy_final"]) == acc[-1]
    assert sorted({float(r["optimizer.lr"]) for r in rows}) == [0.1, 0.5, 2.0]


def test_the_report_can_be_rebuilt_from_the_store(reported, tmp_path: Path) -> None:
    store, config, experiment, summary, _ = reported
    assert stored_config(store, experiment) == config
    again = summarize(store, experiment, config)
    assert again["claims"] == summary["claims"] and again["points"] == summary["points"]


def test_drift_table_says_which_axis_held_each_layers_units(reported) -> None:
    store, _config, _experiment, summary, out = reported
    index = (out / "index.html").read_text()
    assert "<th>layer</th><th>units</th>" in index
    run_id = summary["points"][0]["run_id"]
    layer = next(iter(summary["points"][0]["drift"]))
    (first, *_) = store.probe_units(run_id, layer)
    assert first.dim == 1 and first.source in ("layer", "producer")  # an MLP's features
    assert f"axis 1 ({first.source})</span>" in index


def _copy_with_one_run_cut_short(store: Store, point: str, dest: Path) -> Path:
    """A copy of ``store`` in which ``point``'s run was interrupted after its first
    evaluation: status ``interrupted``, scalars and probe records after it removed
    (what a killed run leaves behind)."""
    import sqlite3

    target = sqlite3.connect(dest)
    source = sqlite3.connect(store.path)
    source.backup(target)
    source.close()
    run_id = target.execute("SELECT id FROM runs WHERE point = ?", (point,)).fetchone()[0]
    first = target.execute(
        "SELECT MIN(step) FROM scalars WHERE run_id = ? AND name = 'test_accuracy' AND step > 0",
        (run_id,),
    ).fetchone()[0]
    target.execute("DELETE FROM scalars WHERE run_id = ? AND step > ?", (run_id, first))
    target.execute("DELETE FROM probe_records WHERE run_id = ? AND step > ?", (run_id, first))
    target.execute(
        "UPDATE runs SET status = 'interrupted', last_step = ? WHERE id = ?", (first, run_id)
    )
    target.commit()
    target.close()
    return dest


def test_a_run_that_has_not_finished_gives_no_number(reported, tmp_path: Path) -> None:
    """An interrupted run holds a prefix of its curves: its last evaluation is not its
    final accuracy, nor its last record the end of its drift. The tables, the CSV and
    the claims leave it out (the claim judged on the seeds that finished) and the
    report says so, where before the prefix was read as the run's result."""
    store, config, experiment, summary, _ = reported
    cut = next(p for p in summary["points"] if p["network"] == "bn" and p["seed"] == 1)
    copy = _copy_with_one_run_cut_short(store, cut["point"], tmp_path / "cut.db")
    with Store(copy, create=False) as short:
        again = summarize(short, experiment, config)
        index = write_report(short, experiment, config, again, tmp_path / "rep")
    row = next(p for p in again["points"] if p["point"] == cut["point"])
    assert row["status"] == "interrupted" and not row["complete"]
    assert row["test_accuracy"]["final"] is None and row["drift"] == {}
    assert again["grid"]["unfinished"] == 1

    # The claim compares bn with plain per seed at each lr: seed 1 at this lr is gone.
    lr = cut["axes"]["optimizer.lr"]
    before = next(c for c in summary["claims"] if c["slice"] == {"optimizer.lr": lr})
    after = next(c for c in again["claims"] if c["slice"] == {"optimizer.lr": lr})
    assert sorted(before["per_seed"]) == ["0", "1"]
    assert list(after["per_seed"]) == ["0"]
    assert after["seeds"] == 1
    seed0 = next(
        p
        for p in summary["points"]
        if p["network"] == "bn" and p["seed"] == 0 and p["axes"] == cut["axes"]
    )
    cell = next(c for c in again["cells"] if c["network"] == "bn" and c["axes"] == cut["axes"])
    assert cell["test_accuracy"]["final"] == seed0["test_accuracy"]["final"]

    page = index.read_text()
    assert "1 of 12 points have not finished (1 interrupted)" in page
    assert f"covshift run --resume {experiment}" in page
    with (tmp_path / "rep" / "points.csv").open() as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert rows[cut["point"]]["status"] == "interrupted"
    assert rows[cut["point"]]["test_accuracy_final"] == ""
    shown = covshift("report", experiment, "--db", str(copy), "--out", "again", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "1 of 12 points have not finished (1 interrupted)" in " ".join(shown.stderr.split())


def test_the_figures_draw_runs_that_have_ended() -> None:
    """The percentile panels show a network's first run that has ended, not one that
    holds a prefix of its records."""
    from covshift.report.figures import _first_runs

    rows = [
        {"network": "bn", "run_id": 3, "complete": False},
        {"network": "bn", "run_id": 4, "complete": True},
        {"network": "plain", "run_id": None, "complete": False},
        {"network": "plain", "run_id": 7, "complete": True},
        {"network": "old", "run_id": 9},  # a summary written before `complete` existed
    ]
    first = _first_runs({"points": rows})
    assert {k: v["run_id"] for k, v in first.items()} == {"bn": 4, "plain": 7, "old": 9}
