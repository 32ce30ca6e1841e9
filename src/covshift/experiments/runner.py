"""Run an experiment: every network of a config, one after the other, into the store.

All networks share the seed, hence the initial weights and the batches; they differ
only in what their :class:`~covshift.experiments.config.NetworkSpec` overrides. Each
network is one run in the store, and all runs of one invocation share an experiment
id. An interrupted experiment resumes with ``resume=<experiment id>``: finished
networks are kept, an unfinished one continues from its last checkpoint (saved at
every evaluation), so nothing recorded is lost or recomputed differently.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from covshift.callbacks import ProgressBar, StoreRecorder, make_progress
from covshift.data import Dataset, load_dataset
from covshift.experiments.config import ConfigError, ExperimentConfig, ModelSpec
from covshift.models import build_cnn, build_mlp
from covshift.probe import ShiftProbe
from covshift.store import RunInfo, Store
from covshift.train import TrainConfig, resolve_device, train

__all__ = ["ExperimentRun", "build_model", "checkpoint_path", "run_experiment"]


@dataclass(frozen=True)
class ExperimentRun:
    """Where an experiment's results are: its id and the store's run ids per network."""

    experiment_id: str
    run_ids: dict[str, int]


def build_model(spec: ModelSpec, data: Dataset, seed: int) -> torch.nn.Module:
    """The network a :class:`ModelSpec` describes, sized for ``data``."""
    common: dict[str, Any] = dict(
        activation=spec.activation,
        norm=spec.norm,
        norm_position=spec.norm_position,
        init=spec.init,
        init_std=spec.init_std,
        norm_kwargs=dict(spec.norm_kwargs),
        seed=seed,
    )
    if spec.kind == "mlp":
        return build_mlp(
            data.num_features, data.num_classes, width=spec.width, depth=spec.depth, **common
        )
    if data.image_shape is None:
        raise ConfigError(
            f"model.kind = 'cnn' needs image data; dataset {data.name!r} has "
            f"flat features of size {data.num_features}"
        )
    return build_cnn(data.image_shape, data.num_classes, channels=spec.channels, **common)


def checkpoint_path(store: Store, run_id: int) -> Path:
    """Where the resumable state of a run is kept while it trains."""
    return store.path.parent / "checkpoints" / f"run-{run_id}.pt"


def new_experiment_id(name: str) -> str:
    return f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def stored_config(store: Store, experiment_id: str) -> ExperimentConfig:
    """The configuration an experiment was started with (for resuming and reports)."""
    runs = store.runs(experiment=experiment_id)
    if not runs:
        raise ConfigError(
            f"no runs of experiment {experiment_id!r} in {store.path}; "
            "`covshift runs` lists the experiments"
        )
    return ExperimentConfig.model_validate(runs[-1].config["experiment"])


def run_experiment(
    config: ExperimentConfig,
    store: Store,
    *,
    resume: str | None = None,
    progress: Progress | None = None,
) -> ExperimentRun:
    """Train every network of ``config``, recording into ``store``.

    Args:
        config: the validated experiment configuration.
        store: where runs, scalars and probe records go.
        resume: an experiment id to continue instead of starting a new experiment.
        progress: a rich progress display to add one bar per network to (a disabled
            one is used when None).
    """
    device = resolve_device(config.device)
    data = load_dataset(config.dataset, config.data_dir).to(device)
    experiment_id = resume or new_experiment_id(config.name)
    previous: dict[str, RunInfo] = {}
    if resume is not None:
        for run in reversed(store.runs(experiment=resume)):  # oldest first; newest wins
            previous[run.config["network"]] = run
    progress = progress or make_progress(disable=True)
    train_config = TrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.optimizer.lr,
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
        eval_every=config.eval_every,
        seed=config.seed,
    )
    run_ids: dict[str, int] = {}
    for key, network in config.networks.items():
        earlier = previous.get(key)
        if earlier is not None and earlier.status == "finished":
            run_ids[key] = earlier.id
            bar = ProgressBar(progress, network.label, config.steps)
            progress.update(bar.task, completed=config.steps, acc="(recorded)")
            continue
        spec = network.resolve(config.model)
        if earlier is not None:
            run_id = earlier.id
            store.reopen_run(run_id)
        else:
            run_id = store.start_run(
                f"{config.name}/{key}",
                config={
                    "experiment": config.model_dump(mode="json"),
                    "network": key,
                    "model": spec.model_dump(mode="json"),
                    "data_source": data.source,
                },
                seed=config.seed,
                preset=config.name,
                experiment=experiment_id,
                device=str(device),
                torch_version=torch.__version__,
            )
        run_ids[key] = run_id
        model = build_model(spec, data, config.seed)
        recorder = StoreRecorder(store, run_id)
        probe = ShiftProbe(
            model,
            config.probe.layers,
            data.x_test[: config.probe.examples],
            every=config.probe.every,
            record=config.probe.record,
            quantiles=config.probe.quantiles,
            sink=recorder.probe_sink,
        )
        bar = ProgressBar(progress, network.label, config.steps)
        with probe:
            train(
                model,
                data,
                train_config,
                callbacks=[probe, recorder, bar],
                device=device,
                checkpoint=checkpoint_path(store, run_id),
            )
    return ExperimentRun(experiment_id, run_ids)
