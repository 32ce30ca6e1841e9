"""What probing costs: training step time with ShiftProbe at its defaults against the
same loop without it, and against the hooks users write today, as ratios in one run.

Models: the Ioffe & Szegedy MLP (784-100-100-100-10 sigmoid, BatchNorm before every
sigmoid, batch 60, SGD lr 0.5) and a small CNN from ``build_cnn`` (channels 16-32-64,
BatchNorm, ReLU, batch 60). Same data (Fashion-MNIST if installed, else synthetic),
same batches, a hand-written loop (what a user's own loop looks like). Variants:

- ``plain``: no hooks;
- ``ShiftProbe defaults``: ``ShiftProbe(model, probe_input=x_test[:P])``, i.e. layers
  ``"auto"`` (every norm and activation input), every 100 steps, 3 quantiles, a
  40-bin histogram, saturation; ``probe.maybe_record(step)`` after each step. The
  label says whether the defaults chose background recording (see
  :mod:`covshift.probe.background`);
- ``ShiftProbe background=...``: the other choice, for comparison;
- ``probe-batch forward alone``: only the no-grad eval forward of the probe batch every
  100 steps, no hooks: the floor of any fixed-batch probe, to separate it from what
  the statistics cost;
- ``ShiftProbe live batches``: the same on the training batches (``source="train"``);
- ``DIY TensorBoard histograms``: a forward pre-hook on the same modules that calls
  ``SummaryWriter.add_histogram`` on the input at every step (or, without the
  tensorboard package, a host copy plus ``numpy.histogram``, which is what
  add_histogram does inside; the table says which);
- ``DIY fastai-style stats``: a forward hook on the same modules that takes mean, std
  and the fraction near zero (``|x| < 0.05``) with one ``.item()`` per statistic per
  step, as fastai's ActivationStats;
- ``gradient ICS / smoothness every 100`` (not with ``--quick``): Santurkar et al.'s
  measures, for scale: a deep copy and several extra forward-backward passes each.

Timing: variants are interleaved in blocks of 100 steps (10 for ResNet-18 and GPT-2,
whose steps take ~0.5 s on one thread; the probes then record every 10 steps, one
record per block), in a rotating order, so that background load hits all alike; the
table shows the median block time per step, its ratio to ``plain`` from the same run,
and the extra milliseconds per block: for a probe, what one record costs, which a user
divides by their own interval.

``--memory STEPS`` also runs a probed training of STEPS steps (records written to a
SQLite store, as in an experiment) and samples the process's resident memory, the
Python heap (tracemalloc) and the number of live tensors every ``--sample-every``
steps: a flat series means nothing accumulates.

    python benchmarks/probe_overhead.py                 # both models, 15 rounds
    python benchmarks/probe_overhead.py --quick         # fewer rounds, no ICS rows
    python benchmarks/probe_overhead.py --memory 20000  # plus the memory series
    python benchmarks/probe_overhead.py --threads 1     # one core: stable on a busy machine
    python benchmarks/probe_overhead.py --only resnet18 --only gpt2 --quick

Two models of the libraries people train (no weights, built from configs, needs the
``huggingface`` extra): ResNet-18 (timm's when timm imports, else transformers' ResNet
of the same layout) on random 3x64x64 images, batch 16, probe batch 64; and a GPT-2 of
4 layers x 256 features on random 64-token sequences, batch 8, probe batch 32, its own
next-token loss. Their probe is ``ShiftProbe(model, probe_input)`` at its defaults.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import nn

from covshift.data import BatchSampler, Dataset, DatasetError, load_dataset
from covshift.models import build_cnn, build_mlp
from covshift.probe import ShiftProbe, gradient_ics, landscape_smoothness
from covshift.probe.select import select_layers
from covshift.store import Store

BLOCK = 100  # steps per timed block for the small models: one probe record each at every=100

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # the optional extra is not installed
    SummaryWriter = None


def logits_of(out: object) -> torch.Tensor:
    """A model's logits, from a tensor or from a Hugging Face output."""
    return out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]


def classification_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(net(x)), y)


def language_model_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return net(input_ids=x, labels=x).loss  # next-token loss; y is unused


@dataclass
class Setup:
    name: str
    build: Callable[[], nn.Module]
    lr: float
    probe_examples: int
    batch: int = 60
    # None: the benchmark's dataset; else (x_train, y_train, x_test) of the model's own
    data: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss
    measures: bool = True  # the gradient-ICS / smoothness rows (cross-entropy models)
    # Steps per timed block, and the probe's interval (one record per block). The big
    # models take ~0.5 s a step on one CPU thread: blocks of 100 would take hours.
    block: int = BLOCK


def resnet18() -> nn.Module:
    """ResNet-18's layout (basic blocks 2-2-2-2, 64-512 channels, BatchNorm, ReLU):
    timm's resnet18 when timm imports, else transformers' ResNet of the same config."""
    try:
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=10)
    except ImportError:  # timm needs a torchvision that matches the CPU torch
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(
            depths=[2, 2, 2, 2],
            hidden_sizes=[64, 128, 256, 512],
            layer_type="basic",
            num_labels=10,
        )
        return ResNetForImageClassification(config)


def gpt2() -> nn.Module:
    """A GPT-2 of 4 layers, 256 features, 4 heads, 2,000 tokens (built from a config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_positions=64,
        vocab_size=2000,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def image_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, 64, 64, generator=g)
    return x, torch.randint(0, 10, (2000,), generator=g), x[:64]


def token_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (2000, 64), generator=g)
    return ids, torch.zeros(2000, dtype=torch.long), ids[:32]


SETUPS = [
    Setup(
        "Ioffe MLP 3x100 sigmoid + BN", lambda: build_mlp(784, 10, norm="batch", seed=0), 0.5, 1000
    ),
    Setup(
        "CNN 16-32-64 relu + BN", lambda: build_cnn((1, 28, 28), 10, norm="batch", seed=0), 0.1, 500
    ),
    Setup(
        "ResNet-18 on 3x64x64 images",
        resnet18,
        0.05,
        64,
        batch=16,
        data=image_batches,
        measures=False,
        block=10,
    ),
    Setup(
        "GPT-2 4x256, 64 tokens",
        gpt2,
        1e-3,
        32,
        batch=8,
        data=token_batches,
        loss=language_model_loss,
        measures=False,
        block=10,
    ),
]
SETUP_KEYS = {"mlp": 0, "cnn": 1, "resnet18": 2, "gpt2": 3}


@dataclass
class Variant:
    """One training loop: model, optimizer, sampler, and what runs around each step."""

    label: str
    net: nn.Module
    opt: torch.optim.Optimizer
    sampler: BatchSampler
    after_step: Callable[[int], None] = lambda step: None
    close: Callable[[], None] = lambda: None
    step: int = 0
    times: list[float] = field(default_factory=list)


def diy_tensorboard(
    net: nn.Module, log_dir: str
) -> tuple[Callable[[int], None], Callable[[], None], str]:
    """A histogram of every probed layer's input at every step, the usual way."""
    modules = select_layers(net, "auto").modules
    state = {"step": 0}
    if SummaryWriter is not None:
        writer = SummaryWriter(log_dir)

        def record(name: str, x: torch.Tensor) -> None:
            writer.add_histogram(name, x, state["step"])

        how, close = "add_histogram", writer.close
    else:
        sink: list[np.ndarray] = []

        def record(name: str, x: torch.Tensor) -> None:
            values = x.detach().cpu().numpy()
            sink.append(np.histogram(values, bins="auto")[0])
            sink.clear()

        how, close = "host copy + numpy.histogram", lambda: None
    handles = [
        m.register_forward_pre_hook(lambda m, a, name=name: record(name, a[0]))
        for name, m in modules.items()
    ]

    def after(step: int) -> None:
        state["step"] = step

    def remove() -> None:
        for h in handles:
            h.remove()
        close()

    return after, remove, how


def diy_fastai(net: nn.Module) -> Callable[[], None]:
    """Mean, std and near-zero fraction per layer per step, one .item() each."""
    modules = select_layers(net, "auto").modules
    stats: list[tuple[float, float, float]] = []

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        stats.append((x.mean().item(), x.std().item(), (x.abs() < 0.05).float().mean().item()))
        if len(stats) > 1000:
            stats.clear()

    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    return lambda: [h.remove() for h in handles]  # type: ignore[return-value]


def make_variants(
    setup: Setup, data: Dataset, quick: bool, log_dir: str
) -> tuple[list[Variant], str]:
    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, BatchSampler]:
        net = setup.build()
        return (
            net,
            torch.optim.SGD(net.parameters(), lr=setup.lr),
            BatchSampler(len(data.x_train), setup.batch, seed=0),
        )

    x_probe = data.x_test[: setup.probe_examples]
    variants = [Variant("plain", *fresh())]
    net, opt, sampler = fresh()
    every = setup.block
    probe = ShiftProbe(net, probe_input=x_probe, every=every)
    probe.check()  # what the first record does: the later ones may go to the background
    mode = "background" if probe._use_background() else "synchronous"
    variants.append(
        Variant(f"ShiftProbe defaults ({mode})", net, opt, sampler, probe.maybe_record, probe.close)
    )
    net, opt, sampler = fresh()
    other = ShiftProbe(net, probe_input=x_probe, every=every, background=mode == "synchronous")
    variants.append(
        Variant(
            f"ShiftProbe background={mode == 'synchronous'}",
            net,
            opt,
            sampler,
            other.maybe_record,
            other.close,
        )
    )
    net, opt, sampler = fresh()

    @torch.no_grad()
    def forward_only(step: int, net: nn.Module = net) -> None:
        # The floor of any fixed-batch probe: the probe batch's forward itself.
        if step % every == 0:
            net.eval()
            net(x_probe)
            net.train()

    variants.append(Variant("probe-batch forward alone (floor)", net, opt, sampler, forward_only))
    net, opt, sampler = fresh()
    live = ShiftProbe(net, source="train", every=every)
    variants.append(
        Variant("ShiftProbe live batches", net, opt, sampler, live.maybe_record, live.close)
    )
    net, opt, sampler = fresh()
    after, remove, how = diy_tensorboard(net, log_dir)
    variants.append(Variant("DIY TensorBoard histograms", net, opt, sampler, after, remove))
    net, opt, sampler = fresh()
    variants.append(Variant("DIY fastai-style stats", net, opt, sampler, close=diy_fastai(net)))
    if not quick and setup.measures:
        for label, measure in (
            (f"gradient ICS every {every}", "ics"),
            (f"smoothness every {every}", "smooth"),
        ):
            net, opt, sampler = fresh()
            x, y = data.x_train[:60], data.y_train[:60]

            def after_step(step: int, net=net, opt=opt, x=x, y=y, measure=measure) -> None:
                if step % every == 0:
                    if measure == "ics":
                        gradient_ics(net, opt, x, y)
                    else:
                        landscape_smoothness(net, x, y, lr=setup.lr)

            variants.append(Variant(label, net, opt, sampler, after_step))
    return variants, how


def run_block(
    v: Variant, data: Dataset, steps: int, loss_fn: Callable = classification_loss
) -> None:
    start = time.perf_counter()
    for _ in range(steps):
        v.step += 1
        idx = v.sampler.next()
        loss = loss_fn(v.net, data.x_train[idx], data.y_train[idx])
        v.opt.zero_grad(set_to_none=True)
        loss.backward()
        v.opt.step()
        v.after_step(v.step)
    v.times.append((time.perf_counter() - start) / steps)


def time_setup(setup: Setup, data: Dataset, rounds: int, quick: bool, console: Console) -> Table:
    if setup.data is not None:  # the model's own inputs (images of its size, token ids)
        x_train, y_train, x_test = setup.data()
        data = SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test)  # type: ignore[assignment]
    block = setup.block
    with tempfile.TemporaryDirectory() as log_dir:
        variants, how = make_variants(setup, data, quick, log_dir)
        progress = Progress(
            TextColumn(f"{setup.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("blocks"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        with progress:
            task = progress.add_task("blocks", total=len(variants) * (rounds + 1))
            for v in variants:  # warm-up block: caches, optimizer state, first record
                v.after_step(0)
                run_block(v, data, block, setup.loss)
                v.times.clear()
                progress.advance(task)
            for r in range(rounds):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for v in order:
                    run_block(v, data, block, setup.loss)
                    progress.advance(task)
        for v in variants:
            v.close()
    base = statistics.median(variants[0].times)
    table = Table(
        title=f"{setup.name}: batch {setup.batch}, probe batch {setup.probe_examples}, "
        f"{rounds} rounds x {block} steps, probes record every {block} steps"
    )
    columns = ("variant", "ms / step (median)", "ratio to plain", "extra ms per block")
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in variants:
        med = statistics.median(v.times)
        label = v.label + (f" ({how})" if v.label.startswith("DIY TensorBoard") else "")
        # What one block of `block` steps costs beyond plain: for the probes, the price of
        # one record, which a user divides by their own interval.
        extra = (med - base) * block * 1e3
        table.add_row(label, f"{med * 1e3:.3f}", f"{med / base:.3f}", f"{extra:.1f}")
    return table


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def memory_run(data: Dataset, steps: int, sample_every: int, console: Console) -> Table:
    """A long probed run of the Ioffe MLP with records going to a SQLite store."""
    net = build_mlp(784, 10, norm="batch", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sampler = BatchSampler(len(data.x_train), 60, seed=0)
    table = Table(title=f"memory of a probed run, {steps} steps (records every 100 to SQLite)")
    for col in ("step", "RSS MiB", "Python heap MiB (tracemalloc)", "live tensors", "records"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp, Store(os.path.join(tmp, "m.db")) as store:
        run_id = store.start_run("memory", config={}, seed=0)
        count = [0]

        def sink(record: object) -> None:
            store.log_probe(run_id, record.step, record.layer, record.stats)  # type: ignore[attr-defined]
            count[0] += 1

        tracemalloc.start()
        with ShiftProbe(net, probe_input=data.x_test[:1000], sink=sink) as probe:
            probe.maybe_record(0)
            for step in range(1, steps + 1):
                idx = sampler.next()
                loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                probe.maybe_record(step)
                if step % sample_every == 0:
                    heap = tracemalloc.get_traced_memory()[0] / 2**20
                    row = (step, f"{rss_mb():.1f}", f"{heap:.2f}", live_tensors(), count[0])
                    table.add_row(*map(str, row))
        tracemalloc.stop()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved blocks per variant")
    parser.add_argument("--quick", action="store_true", help="5 rounds, no gradient ICS rows")
    parser.add_argument(
        "--memory", type=int, default=0, metavar="STEPS", help="also run the memory series"
    )
    parser.add_argument("--sample-every", type=int, default=1000)
    parser.add_argument(
        "--only",
        choices=list(SETUP_KEYS),
        action="append",
        help="time these models only (repeatable; default: all)",
    )
    parser.add_argument(
        "--probe-examples", type=int, default=0, help="probe batch size (0: 1000 MLP, 500 CNN)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 gives stable figures on a busy machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else args.rounds
    try:
        data = load_dataset("fashion-mnist")
    except DatasetError:
        data = load_dataset("synthetic", n_train=60000, n_test=10000)
    console = Console(width=130)  # whole rows, also when the output goes to a file
    console.print(
        f"data: {data.name}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"
    )
    setups = [SETUPS[SETUP_KEYS[k]] for k in args.only] if args.only else SETUPS
    if args.probe_examples:
        setups = [replace(s, probe_examples=args.probe_examples) for s in setups]
    for setup in setups:
        console.print(time_setup(setup, data, rounds, args.quick, console))
    if args.memory:
        console.print(memory_run(data, args.memory, args.sample_every, console))


if __name__ == "__main__":
    main()
