"""What both trainer callbacks share, without a trainer: the probe batch taken from a
training batch, and a run left open when the process dies of an exception."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import covshift
from covshift.integrations._session import ProbeSession
from covshift.integrations._settings import CALLBACK_DEFAULTS
from covshift.integrations._trainer_objects import first_examples
from covshift.probe import ShiftProbe
from covshift.probe.settings import PROBE_DEFAULTS
from covshift.store import Store


def test_first_examples_cuts_the_batch_and_copies() -> None:
    ids = torch.arange(12).reshape(4, 3)
    scale = torch.tensor(2.0)  # not a batch tensor: kept as it is
    batch, target = first_examples({"input_ids": ids, "scale": scale}, torch.arange(4), n=2)
    assert batch.kwargs["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert batch.kwargs["scale"].item() == 2.0
    assert target.tolist() == [0, 1]
    ids[0, 0] = 99  # the trainer reusing its buffer changes nothing
    assert batch.kwargs["input_ids"][0, 0] == 0


def test_session_records_the_schedule(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    session = ProbeSession(every=2, store=tmp_path / "c.db", probe_size=5)
    session.begin(model, step=0)
    assert session.needs_batch
    session.set_batch(torch.randn(8, 3))
    for step in range(1, 5):
        session.step(step)
    session.end("finished")
    assert [r.step for r in session.records] == [0, 2, 4]
    assert int(session.records[0].stats["count"]) == 5
    with Store(tmp_path / "c.db", create=False) as store:
        assert store.run(session.run_id).status == "finished"
        # The records go through the one store path: with the axis of their units.
        units = store.probe_units(session.run_id, "1")
        assert [(u.step, u.dim, u.source) for u in units] == [
            (0, 1, "producer"),
            (2, 1, "producer"),
            (4, 1, "producer"),
        ]


def test_run_left_open_by_an_uncaught_exception_is_failed_at_exit(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    script = textwrap.dedent(
        f"""
        import torch
        from covshift.integrations._session import ProbeSession
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        session = ProbeSession(every=1, probe_input=torch.randn(4, 3), store={str(db)!r})
        session.begin(model, step=0)
        raise ValueError("training blew up")
        """
    )
    src = str(Path(covshift.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "training blew up" in done.stderr
    with Store(db, create=False) as store:
        (run,) = store.runs()
        assert run.status == "failed" and "ValueError: training blew up" in run.error
        assert store.probe(run.id, "1", "mean")[0].tolist() == [0]


def test_warns_when_the_first_batch_never_came() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    session = ProbeSession(every=1)
    session.begin(model, step=0)
    session.step(1)
    with pytest.warns(UserWarning, match="no training forward of the probed module"):
        session.end("finished")
    assert session.records == []


def test_settings_are_declared_once_and_unknown_keywords_are_refused() -> None:
    """The probe's settings are one declaration: a keyword it does not declare is a
    TypeError naming it, as for a named parameter, and the callbacks' defaults are the
    probe's (but for background) and refuse what the session sets itself."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with pytest.raises(
        TypeError, match=r"ShiftProbe.__init__\(\) got an unexpected keyword argument 'bns'"
    ):
        ShiftProbe(model, probe_input=torch.randn(4, 3), bns=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"got an unexpected keyword argument 'bns'"):
        ProbeSession(bns=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"the callback sets \['reduce', 'sink'\] of ShiftProbe"):
        ProbeSession(sink=print, reduce=True)  # type: ignore[call-arg]
    probe = ShiftProbe(model, probe_input=torch.randn(4, 3), bins=7, every=3)
    assert probe.config.bins == 7 and probe.config.quantiles == PROBE_DEFAULTS["quantiles"]
    assert probe.schedule.due(3) and not probe.schedule.due(2)
    shared = PROBE_DEFAULTS.keys() & CALLBACK_DEFAULTS.keys()
    assert {k for k in shared if PROBE_DEFAULTS[k] != CALLBACK_DEFAULTS[k]} == {"background"}
    session = ProbeSession(bins=7, quantiles=(0.5,))
    assert session.probe_options == {"bins": 7, "quantiles": (0.5,), "background": False}
