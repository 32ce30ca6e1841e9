"""Training-step time of covshift's byte-level transformer against the same model built
from torch.nn layers, and ms per step over a grid of sizes.

Speed table (default): for each norm kind and size, three contenders train from the
same weights on the same batches of the World English Bible (synthetic text if it is
not installed) with AdamW (torch's fused implementation, as covshift's loop uses):

- ``torch``: a nanoGPT-style model written here with torch.nn's LayerNorm / RMSNorm /
  BatchNorm1d (over the B*T tokens), in a plain loop (random offsets, forward,
  cross-entropy, backward, step): the peer;
- ``covshift``: :func:`covshift.models.build_transformer` (covshift.nn's norms) in the
  same plain loop;
- ``loop``: the same covshift model in :func:`covshift.training.train` (its steps timed
  by a callback, evaluations left out).

Blocks of steps are interleaved (torch, covshift, loop, torch, ...) so that background
load hits all alike; the table shows the median ms per step and the ratios to torch
(above 1: covshift is slower), and the ratio of the fastest blocks ("min ratio", less
moved by a block that was preempted on a busy machine), at each ``--threads`` count.

Norms against LayerNorm (``--against-layer``): covshift's LayerNorm, RMSNorm and
Dynamic Tanh models and torch.nn's LayerNorm and RMSNorm peers, same weights and
batches, in interleaved blocks of steps; each one's ms per step over LayerNorm's
(covshift's), median and fastest blocks: the benchmark behind "RMSNorm is faster per
step" (Zhang & Sennrich 2019), which the battery does not judge inside a run (a run's
step time moves with the machine's load).

Grid table (``--grid``): ms per training step (covshift's loop, AdamW, pre-LayerNorm)
for d_model 64/128, 2/4/6 layers, context 64/128, batch 16/32 at one thread: what
the quick sizes of the battery's presets are chosen from.

    python benchmarks/transformer_speed.py                 # 1 and 2 threads
    python benchmarks/transformer_speed.py --grid          # the sizes table, 1 thread
    python benchmarks/transformer_speed.py --against-layer # RMSNorm, DyT / LayerNorm
    python benchmarks/transformer_speed.py --quick         # fewer repeats
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from covshift.data import BatchSampler, DatasetError, TextDataset, load_dataset
from covshift.models import build_transformer
from covshift.training import TrainConfig, TrainState, train

NORMS = ("none", "layer", "rms", "batch")

# ---------------------------------------------------------------- the torch.nn peer


class TokenBatchNorm1d(nn.Module):
    """torch.nn.BatchNorm1d over the B*T tokens of (B, T, C) values."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)


def torch_norm(kind: str, c: int) -> nn.Module:
    return {"none": nn.Identity, "layer": nn.LayerNorm, "rms": nn.RMSNorm}.get(
        kind, TokenBatchNorm1d
    )(c)


class Attention(nn.Module):
    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.c_attn(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: int, heads: int, norm: str) -> None:
        super().__init__()
        self.ln_1, self.attn = torch_norm(norm, c), Attention(c, heads)
        self.ln_2, self.mlp = torch_norm(norm, c), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pre-norm, as GPT-2
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, context: int, c: int, layers: int, heads: int, norm: str) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, c), nn.Embedding(context, c)
        self.blocks = nn.ModuleList(Block(c, heads, norm) for _ in range(layers))
        self.ln_f, self.head = torch_norm(norm, c), nn.Linear(c, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------- timing


def plain_steps(model: nn.Module, data: TextDataset, batch: int) -> Callable[[int], float]:
    """nanoGPT's loop on ``model``; returns a function timing ``n`` steps (ms/step)."""
    # torch's fused AdamW, which covshift's loop trains with too: the contenders differ
    # in their models and loops, not in their optimizers
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sampler = BatchSampler(len(data.x_train), batch, seed=0)

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            idx = sampler.next()
            logits = model(data.x_train[idx])
            loss = F.cross_entropy(logits.view(-1, 256), data.y_train[idx].view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) * 1e3 / n

    return run


def loop_steps(model: nn.Module, data: TextDataset, batch: int, n: int) -> float:
    """ms per step of covshift's loop, from the step ends a callback sees (the
    evaluations at step 0 and at the end fall outside)."""
    ends: list[float] = []

    class Clock:
        def on_step_end(self, state: TrainState) -> None:
            ends.append(time.perf_counter())

    config = TrainConfig(steps=n + 1, batch_size=batch, lr=1e-3, optimizer="adamw", eval_every=0)
    train(model, data.first_test(1), config, callbacks=[Clock()], device="cpu")
    return (ends[-1] - ends[0]) * 1e3 / n


def text_data(context: int) -> TextDataset:
    try:
        data = load_dataset("world-english-bible", context=context)
    except DatasetError:
        data = load_dataset("synthetic-text", context=context)
    assert isinstance(data, TextDataset)
    return data


def speed_row(
    norm: str, size: tuple[int, int, int, int], repeats: int, block: int
) -> dict[str, list[float]]:
    c, layers, context, batch = size
    data = text_data(context)
    ours = build_transformer(context=context, d_model=c, n_layer=layers, n_head=4, norm=norm)
    peer = GPT(context, c, layers, 4, norm)
    peer.load_state_dict(ours.state_dict())
    loop_model = build_transformer(context=context, d_model=c, n_layer=layers, n_head=4, norm=norm)
    runs = {"torch": plain_steps(peer, data, batch), "covshift": plain_steps(ours, data, batch)}
    for run in runs.values():
        run(2)  # warm-up: allocations, kernel loading
    loop_steps(loop_model, data, batch, 2)
    samples: dict[str, list[float]] = {"torch": [], "covshift": [], "loop": []}
    for _ in range(repeats):
        samples["torch"].append(runs["torch"](block))
        samples["covshift"].append(runs["covshift"](block))
        samples["loop"].append(loop_steps(loop_model, data, batch, block))
    return samples


def speed_table(
    threads: list[int], norms: list[str], repeats: int, block: int, console: Console
) -> None:
    sizes = [(64, 2, 64, 16), (128, 4, 128, 16)]
    for count in threads:
        torch.set_num_threads(count)
        table = Table(
            title=f"transformer training step (AdamW), {count} thread(s), median of {repeats} "
            f"interleaved blocks of {block} steps; ratio > 1: covshift slower"
        )
        for col in ("norm", "d_model x layers, context, batch", "torch ms", "covshift ms"):
            table.add_column(col, justify="left" if col.startswith(("norm", "d_")) else "right")
        for col in ("covshift/torch", "min ratio", "loop ms", "loop/torch"):
            table.add_column(col, justify="right")
        for norm, size in itertools.product(norms, sizes):
            samples = speed_row(norm, size, repeats, block)
            s = {k: statistics.median(v) for k, v in samples.items()}
            fastest = min(samples["covshift"]) / min(samples["torch"])
            c, layers, context, batch = size
            table.add_row(
                norm,
                f"{c} x {layers}, {context}, {batch}",
                f"{s['torch']:.1f}",
                f"{s['covshift']:.1f}",
                f"{s['covshift'] / s['torch']:.3f}",
                f"{fastest:.3f}",
                f"{s['loop']:.1f}",
                f"{s['loop'] / s['torch']:.3f}",
            )
            console.log(f"{count}T {norm} {size}: covshift/torch {s['covshift'] / s['torch']:.3f}")
        console.print(table)


def against_layer(threads: list[int], repeats: int, block: int, console: Console) -> None:
    """Every contender's ms per step over covshift's LayerNorm's, interleaved blocks."""
    sizes = [(64, 2, 64, 16), (128, 4, 128, 16)]
    for count, size in itertools.product(threads, sizes):
        torch.set_num_threads(count)
        c, layers, context, batch = size
        data = text_data(context)
        runs = {}
        for norm in ("layer", "rms", "dyt"):
            model = build_transformer(
                context=context, d_model=c, n_layer=layers, n_head=4, norm=norm
            )
            runs[f"covshift {norm}"] = plain_steps(model, data, batch)
            if norm != "dyt":  # torch.nn has no Dynamic Tanh
                peer = GPT(context, c, layers, 4, norm)
                peer.load_state_dict(model.state_dict())
                runs[f"torch {norm}"] = plain_steps(peer, data, batch)
        for run in runs.values():
            run(2)  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                samples[name].append(run(block))
        base = samples["covshift layer"]
        table = Table(
            title=f"{c} x {layers}, context {context}, batch {batch}, {count} thread(s): ms per "
            f"step over covshift's LayerNorm, {repeats} interleaved blocks of {block} steps"
        )
        for col in ("model", "ms (median)", "/ LayerNorm (median)", "/ LayerNorm (fastest)"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, values in samples.items():
            median = statistics.median(values)
            table.add_row(
                name,
                f"{median:.1f}",
                f"{median / statistics.median(base):.3f}",
                f"{min(values) / min(base):.3f}",
            )
        console.print(table)


def grid_table(repeats: int, block: int, console: Console) -> None:
    torch.set_num_threads(1)
    table = Table(
        title=f"ms per training step, covshift loop, AdamW, pre-LayerNorm, 4 heads, 1 thread "
        f"(median of {repeats} blocks of {block} steps)"
    )
    for col in ("d_model", "layers", "context", "batch 16", "batch 32"):
        table.add_column(col, justify="right")
    for c, layers, context in itertools.product((64, 128), (2, 4, 6), (64, 128)):
        data = text_data(context)
        cells = []
        for batch in (16, 32):
            model = build_transformer(context=context, d_model=c, n_layer=layers, n_head=4)
            loop_steps(model, data, batch, 2)  # warm-up
            cells.append(
                statistics.median(loop_steps(model, data, batch, block) for _ in range(repeats))
            )
        table.add_row(str(c), str(layers), str(context), *(f"{ms:.0f}" for ms in cells))
        console.log(f"{c} x {layers}, context {context}: {cells[0]:.0f} / {cells[1]:.0f} ms")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", action="store_true", help="the ms/step table over sizes")
    parser.add_argument(
        "--against-layer", action="store_true", help="RMSNorm and DyT steps over LayerNorm's"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats of 3 steps")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--norms", nargs="*", default=list(NORMS), choices=NORMS, help="rows (default: all)"
    )
    args = parser.parse_args(argv)
    repeats, block = (3, 3) if args.quick else (args.repeats, args.block)
    console = Console(width=150)
    console.print(f"torch {torch.__version__}, data: {text_data(64).name}")
    if args.grid:
        grid_table(repeats, block, console)
    elif args.against_layer:
        against_layer(args.threads, repeats, block, console)
    else:
        speed_table(args.threads, args.norms, repeats, block, console)


if __name__ == "__main__":
    main()
