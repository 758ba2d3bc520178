"""Step-time cost of the weighting policies (focal, loss-softmax, OHEM weight mode) against plain Lightning.

The issue's goal is a weighting policy's step at most 1.05× a plain step. Every arm trains the same
``NoisyLabelClassifier`` MLP on the same noisy-digits batches with the same seed; ``plain`` returns the
scalar mean loss to a stock Trainer (no lightning_select callback), ``engine`` runs the engine with a
policy that does nothing (``UniformSubset(keep=1.0)``: the engine's own fixed cost), and each weighting
arm runs one policy. Arms are interleaved round by round (order reversed every other round); the figure
is the median step time from batch start to batch end (forward, weights, backward, optimizer step), the
first 5 steps of each fit dropped.

    python benchmarks/weighting_overhead.py      # writes benchmarks/results/weighting_overhead.json
    python benchmarks/weighting_overhead.py --rounds 3 --configs 256x1024
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
from common import StepTimer  # noqa: E402

from lightning_select import OHEM, FocalWeighting, LossSoftmaxWeighting, UniformSubset  # noqa: E402
from lightning_select.data.noisy_labels import NoisyDigitsDataModule  # noqa: E402
from lightning_select.models.classifier import NoisyLabelClassifier  # noqa: E402

ARMS = ["plain", "engine", "focal", "loss_softmax", "ohem_weight"]


def make_policy(arm: str) -> pl.Callback:
    return {"engine": lambda: UniformSubset(keep=1.0), "focal": FocalWeighting,
            "loss_softmax": LossSoftmaxWeighting, "ohem_weight": lambda: OHEM(keep=0.25, mode="weight")}[arm]()


def run_arm(arm: str, epochs: int, batch_size: int, hidden: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer] + ([] if arm == "plain" else [make_policy(arm)])
    model = NoisyLabelClassifier(arch="mlp", hidden=hidden, lr=3e-3, plain_loss=arm == "plain")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    trainer.fit(model, NoisyDigitsDataModule(batch_size=batch_size))
    return timer.times[5:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--configs", default="64x128,256x1024,1024x2048",
                        help="comma-separated BATCHxHIDDEN sizes; 64x128 is the harness's digits setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weighting_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = []
    for config in args.configs.split(","):
        batch_size, hidden = (int(v) for v in config.split("x"))
        steps: dict[str, list[float]] = {a: [] for a in ARMS}
        for r in range(args.rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                steps[arm] += run_arm(arm, args.epochs, batch_size, hidden)
            print(f"[{config}] round {r + 1}/{args.rounds}", flush=True)
        med = {a: statistics.median(steps[a]) for a in ARMS}
        configs.append({"batch_size": batch_size, "hidden": hidden, "steps_per_arm": {a: len(steps[a]) for a in ARMS},
                        "median_step_ms": {a: round(1e3 * med[a], 4) for a in ARMS},
                        "ratio_to_plain": {a: round(med[a] / med["plain"], 4) for a in ARMS}})
        print(json.dumps(configs[-1]), flush=True)
    result = {"benchmark": "weighting_overhead",
              "command": "python benchmarks/weighting_overhead.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "arms": {"plain": "stock Lightning, scalar mean loss", "engine": "engine + UniformSubset(keep=1.0)",
                       "focal": "FocalWeighting() (gamma 2, gradient-matched weights)",
                       "loss_softmax": "LossSoftmaxWeighting() (T = 1, cap 10x the mean)",
                       "ohem_weight": "OHEM(keep=0.25, mode='weight')"},
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
              "lightning": pl.__version__, "threads": args.threads, "configs": configs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
