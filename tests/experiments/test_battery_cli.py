"""``covshift claims`` and ``covshift presets`` end to end, on two battery presets cut
down to a few steps."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from covshift.experiments.battery import BATTERY

from .helpers import covshift

SMALL = [
    "--only", "shift-causes", "--only", "santurkar2018-linear", "--seeds", "2",
    "--set", "steps=100", "--set", "eval_every=50", "--set", "probe.every=50",
    "--set", "probe.gradient_ics_every=50", "--set", "probe.smoothness_every=50",
]  # fmt: skip


def _runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def test_claims_writes_one_report_and_a_second_call_runs_nothing(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    first = covshift("claims", *SMALL, "--db", str(db), "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    printed = json.loads(first.stdout)["claims"]
    out = tmp_path / "reports" / "battery-quick"
    page = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in page["claims"]] == [c["id"] for c in printed]
    assert page["claims"][-1]["id"] == "shift-vs-speed"
    html = (out / "claims.html").read_text()
    fields = {
        "estimate", "interval", "verdict", "rule_text", "per_seed", "kind", "p_value",
        "p_adjusted", "adjust_method", "censored", "excluded_units", "measurable",
        "margin_reason",
    }  # fmt: skip
    for claim in page["claims"]:
        assert fields <= set(claim)
        assert claim["kind"] in ("hypothesis", "check")
        if claim["kind"] == "check":
            assert claim["verdict"] in ("pass", "fail", "not measured")
            assert claim["p_adjusted"] is None
        if claim["verdict"] == "supported" and claim["interval"][0] == claim["interval"][1]:
            assert claim["censored"]["censored"]  # never a zero-width "supported"
    hypotheses = [c for c in page["claims"] if c["kind"] == "hypothesis"]
    family = sum(c["p_value"] is not None for c in hypotheses)
    assert page["family_size"] == family and page["adjust_method"] == "holm"
    assert all(c["family_size"] == family for c in hypotheses if c["p_value"] is not None)
    assert {c["id"] for c in page["checks"]} >= {"control-zero", "exists-head"}
    assert set(page["preregistration"]) == {"shift-causes", "santurkar2018-linear"}
    for record in page["preregistration"].values():
        assert len(record["hash"]) == 16 and record["first_recorded"] and record["changes"] == []
    assert "Every hypothesis against its rule" in html and "<h2>Checks</h2>" in html
    assert (out / "forest.png").is_file()
    for claim in page["claims"]:
        assert Path(claim["figure"]).is_file()
        assert f'id="{claim["id"]}' in html
    # the numbers of each claim's figure are those of its preset's own claims.json
    for preset in page["presets"]:
        own = json.loads((out / preset["experiment"] / "claims.json").read_text())["claims"]
        mine = [c for c in page["claims"] if c.get("preset") == preset["preset"]]
        assert [(c["id"], c["estimate"], c["per_seed"], c["p_value"]) for c in mine] == [
            (c["id"], c["estimate"], c["per_seed"], c["p_value"]) for c in own
        ]  # the same numbers; only the adjustment's family differs
        assert all(Path(c["figure"]).name == o["figure"] for c, o in zip(mine, own, strict=True))
    causes = next(p for p in page["presets"] if p["preset"] == "shift-causes")
    matrix = causes["attribution_matrix"]
    assert matrix["layers"][-1] == "head" and len(matrix["share_removed"]) == 7
    assert "Attribution matrix" in html and "data:image/png;base64," in html
    linear = [c for c in page["claims"] if c.get("preset") == "santurkar2018-linear"]
    assert all(c["seeds"] == 2 for c in linear)  # ICS and smoothness were measured
    control = next(c for c in page["claims"] if c["id"] == "control-zero")
    assert control["per_seed"] == {"0": 0.0, "1": 0.0}  # frozen upstream: no drift at all

    runs = _runs(db)
    assert runs == 2 * (8 + 2)
    second = covshift("claims", *SMALL, "--db", str(db), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert _runs(db) == runs
    assert "estimated 0s to run" in second.stdout

    # A point whose run is held by a live process elsewhere (here: this one) has not
    # ended: the battery leaves its numbers out and both pages say so.
    import os
    import socket

    with sqlite3.connect(db) as con:
        held = con.execute(
            "SELECT id FROM runs WHERE preset = 'santurkar2018-linear' ORDER BY id LIMIT 1"
        ).fetchone()[0]
        con.execute(
            "UPDATE runs SET status = 'running', host = ?, pid = ? WHERE id = ?",
            (socket.gethostname(), os.getpid(), held),
        )
    third = covshift("claims", *SMALL, "--db", str(db), cwd=tmp_path)
    page = json.loads((out / "claims.json").read_text())
    linear = next(p for p in page["presets"] if p["preset"] == "santurkar2018-linear")
    assert linear["unfinished"].startswith("1 of 4 points have not finished (1 running)")
    assert "the same `covshift claims` completes them" in linear["unfinished"]
    assert next(p for p in page["presets"] if p["preset"] == "shift-causes")["unfinished"] is None
    html = (out / "claims.html").read_text()
    assert html.count("have not finished") == 2  # at the top and in the preset's part
    own = (out / linear["experiment"] / "index.html").read_text()
    assert "1 of 4 points have not finished (1 running)" in own
    claims = [c for c in page["claims"] if c.get("preset") == "santurkar2018-linear"]
    assert any(c["seeds"] == 1 for c in claims)  # judged on the seed that finished
    assert third.returncode == 0, third.stderr
    assert "santurkar2018-linear: 1 of 4 points have not finished" in " ".join(third.stderr.split())


def test_claims_and_presets_refuse_bad_input(tmp_path: Path) -> None:
    bad = covshift("claims", "--only", "nope", "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert bad.returncode == 2 and "--only nope: not battery presets" in bad.stderr
    size = covshift("claims", "--size", "huge", "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert size.returncode == 2 and "--size must be quick or full" in size.stderr
    assert not (tmp_path / "c.db").exists()
    listing = covshift("presets", cwd=tmp_path)
    assert listing.returncode == 0
    for name in BATTERY:
        assert name in listing.stdout
    assert "min" in listing.stdout


@pytest.mark.slow
def test_claims_on_ray_give_the_local_numbers(tmp_path: Path) -> None:
    tiny = [
        "--only", "santurkar2018-linear", "--seeds", "2", "--set", "steps=40",
        "--set", "eval_every=20", "--set", "probe.every=20",
        "--set", "probe.gradient_ics_every=20", "--set", "probe.smoothness_every=20",
    ]  # fmt: skip
    results = []
    for backend in ("local", "ray"):
        db = tmp_path / backend / "c.db"
        done = covshift(
            "claims", *tiny, "--backend", backend, "--threads", "1", "--db", str(db), "--json",
            cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results.append({c["id"]: c["per_seed"] for c in json.loads(done.stdout)["claims"]})
    assert results[0] == results[1]
    assert any(v for v in results[0].values())


def test_a_report_folder_below_a_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    tiny = ["--only", "santurkar2018-linear", "--seeds", "1", "--set", "steps=10",
            "--set", "eval_every=5", "--set", "probe.every=5",
            "--set", "probe.gradient_ics_every=5", "--set", "probe.smoothness_every=5"]  # fmt: skip
    done = covshift(
        "claims", *tiny, "--db", str(tmp_path / "c.db"), "--out", str(blocker / "sub"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--out {blocker / 'sub'}: {blocker} is a file, not a folder" in done.stderr
    assert not (tmp_path / "c.db").exists()  # refused before anything was written
    under = covshift("claims", *tiny, "--db", str(blocker / "c.db"), cwd=tmp_path)
    assert under.returncode == 2 and f"--db {blocker}: {blocker} is a file" in under.stderr
