"""Step-time cost of SelectiveBackprop (paper, Composer, stale scores) and UniformSubset against plain Lightning.

Same model (the digits MLP embedder), data, seed and Trainer settings in every arm. ``plain`` is a
stock Lightning step on the full batch (the module returns its reduced InfoNCE loss, no
lightning_select callback). Every other arm runs the engine with one policy:

* ``sb_paper``: the paper rule (β = 3, R = 1024), selecting from the first step (``warmup_epochs=0``),
  so every step pays the no-grad scoring pass of the full batch;
* ``sb_composer``: Composer's rule with ``keep=0.5`` on every step (no start/end/interrupt);
* ``sb_stale``: the paper rule on stale scores (no scoring pass). Its first epoch trains everything
  (no sample has a recorded loss yet);
* ``uniform``: ``UniformSubset(keep=0.5)``, the same trained rows as ``sb_composer``;
* ``uniform_025``: ``UniformSubset(keep=0.25)``, about the rows the paper rule keeps (``1/(β+1)``), so
  ``sb_paper − uniform_025`` and ``sb_stale − uniform_025`` isolate the cost of choosing *which* rows;
* ``importance``: ``ImportanceSampling(keep=1/3, score="loss", always_on=True)``, against
  ``uniform_033`` (``UniformSubset(keep=1/3)``, the same trained rows). RHO-LOSS needs class targets
  and an irreducible-loss table, so its step cost is measured in ``benchmarks/selection_noisy.py``.

The arms are interleaved round by round (order reversed every other round) so that machine noise
hits all of them; the figure is the median per-step time from batch start to batch end (forward,
scoring pass, selection, backward and optimizer step), the first 5 steps of each fit dropped. The
ratio to ``plain`` therefore includes the scoring pass. Kept fractions come from one extra,
untimed fit per arm with a recording observer.

    python benchmarks/selection_overhead.py      # writes benchmarks/results/selective_backprop_overhead.json
    python benchmarks/selection_overhead.py --rounds 3 --epochs 2 --configs 128x256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepTimer, timed_digits_fit  # noqa: E402

from lightning_select import (  # noqa: E402
    ImportanceSampling,
    SelectionEngine,
    SelectionPolicy,
    SelectiveBackprop,
    UniformSubset,
)

ARMS = ["plain", "sb_paper", "sb_composer", "sb_stale", "uniform", "uniform_025", "importance", "uniform_033"]


def make_policy(arm: str) -> SelectionPolicy:
    if arm == "sb_paper":
        return SelectiveBackprop(warmup_epochs=0)
    if arm == "sb_composer":
        return SelectiveBackprop(rule="composer", keep=0.5)
    if arm == "sb_stale":
        return SelectiveBackprop(stale_scores=True)
    if arm == "uniform":
        return UniformSubset(keep=0.5)
    if arm == "uniform_025":
        return UniformSubset(keep=0.25)
    if arm == "importance":  # always on, so every step pays the scoring pass and the resampling
        return ImportanceSampling(keep=1 / 3, score="loss", always_on=True)
    if arm == "uniform_033":
        return UniformSubset(keep=1 / 3)
    raise ValueError(arm)


class SyncedStepTimer(StepTimer):
    """:class:`StepTimer` that waits for the GPU at batch start and end (CUDA work is asynchronous)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class KeptRows(SelectionPolicy):
    """Untimed runs only: the trained rows and the loaded rows of every step."""

    order = 990

    def __init__(self) -> None:
        self.kept, self.loaded = 0, 0

    def observe(self, ctx) -> None:
        self.kept += int(ctx.rows.numel()) if ctx.has_samples else 0
        self.loaded += ctx.batch_size


def run_arm(arm: str, epochs: int, batch_size: int, hidden: int, count: bool = False,
            accelerator: str = "cpu") -> tuple[list[float], float, float]:
    timer = SyncedStepTimer()
    callbacks: list[pl.Callback] = [timer]
    counter = KeptRows()
    if arm != "plain":
        callbacks += [SelectionEngine(), make_policy(arm)] + ([counter] if count else [])
    wall = timed_digits_fit(callbacks, arm == "plain", epochs, batch_size, hidden, accelerator)
    kept = counter.kept / counter.loaded if counter.loaded else 1.0
    return timer.times[5:], wall, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--configs", default="128x256,256x1024",
                        help="comma-separated BATCHxHIDDEN sizes; 128x256 is the digits default (conf/)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", help="cpu (the README's figures) or gpu")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "selective_backprop_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    per_config = []
    for config in args.configs.split(","):
        batch_size, hidden = (int(v) for v in config.split("x"))
        steps: dict[str, list[float]] = {a: [] for a in ARMS}
        walls: dict[str, list[float]] = {a: [] for a in ARMS}
        round_medians: dict[str, list[float]] = {a: [] for a in ARMS}
        for r in range(args.rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                t, wall, _ = run_arm(arm, args.epochs, batch_size, hidden, accelerator=args.accelerator)
                steps[arm] += t
                walls[arm].append(wall)
                round_medians[arm].append(statistics.median(t))
            print(f"[{config}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{a} {1e3 * round_medians[a][-1]:.3f} ms" for a in ARMS), flush=True)
        kept = {a: run_arm(a, args.epochs, batch_size, hidden, count=True, accelerator=args.accelerator)[2]
                for a in ARMS}
        med = {a: statistics.median(steps[a]) for a in ARMS}
        per_config.append({
            "batch_size": batch_size,
            "hidden": hidden,
            "steps_per_arm": {a: len(steps[a]) for a in ARMS},
            "median_step_ms": {a: round(1e3 * med[a], 4) for a in ARMS},
            "step_time_ratio_to_plain": {a: round(med[a] / med["plain"], 4) for a in ARMS},
            "per_round_ratio_to_plain": {a: [round(x / p, 4) for x, p in zip(round_medians[a], round_medians["plain"])]
                                         for a in ARMS},
            "fit_wall_ratio_to_plain": {a: round(statistics.median(walls[a]) / statistics.median(walls["plain"]), 4)
                                        for a in ARMS},
            "kept_fraction": {a: round(kept[a], 4) for a in ARMS},
            # the cost of choosing which rows, against a uniform subset of about the same size
            "ms_over_matched_uniform": {
                "sb_paper": round(1e3 * (med["sb_paper"] - med["uniform_025"]), 4),
                "sb_stale": round(1e3 * (med["sb_stale"] - med["uniform_025"]), 4),
                "sb_composer": round(1e3 * (med["sb_composer"] - med["uniform"]), 4),
                "importance": round(1e3 * (med["importance"] - med["uniform_033"]), 4)},
        })
    result = {
        "benchmark": "selective_backprop_overhead",
        "command": "python benchmarks/selection_overhead.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "arms": {"plain": "stock Lightning, full batch, scalar loss",
                 "sb_paper": "SelectiveBackprop(warmup_epochs=0): scoring pass every step, beta=3, R=1024",
                 "sb_composer": "SelectiveBackprop(rule='composer', keep=0.5): scoring pass every step",
                 "sb_stale": "SelectiveBackprop(stale_scores=True): no scoring pass; epoch 0 trains everything",
                 "uniform": "UniformSubset(keep=0.5)",
                 "uniform_025": "UniformSubset(keep=0.25)",
                 "importance": "ImportanceSampling(keep=1/3, score='loss', always_on=True): scoring pass, "
                               "resampling with replacement, 1/(B p) weights every step",
                 "uniform_033": "UniformSubset(keep=1/3)"},
        "epochs": args.epochs,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "accelerator": args.accelerator,
        "device": torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "cpu",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": args.threads,
        "configs": per_config,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
