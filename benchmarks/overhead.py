"""Step-time overhead of the lightning_select engine + LossHistory against plain Lightning.

Same model (the digits MLP embedder), same data, same seed, same Trainer settings; the only
difference is the module returning a reduced scalar (plain) or an EmbeddingOutput routed through
the engine with a LossHistory observer. Arms are interleaved round by round so that machine noise
hits both; the reported figure is the ratio of median per-step times (batch start to batch end,
which covers forward, engine, backward and optimizer step).

    python benchmarks/overhead.py                 # writes benchmarks/results/overhead.json
    python benchmarks/overhead.py --rounds 3 --epochs 2 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_select import LossHistory, SampleLossStore, SelectionEngine

from common import StepTimer, timed_digits_fit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def run_arm(arm: str, epochs: int, batch_size: int, hidden: int) -> tuple[list[float], float]:
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if arm == "engine+history":
        callbacks += [SelectionEngine(), LossHistory()]
    wall = timed_digits_fit(callbacks, arm == "plain", epochs, batch_size, hidden)
    return timer.times[5:], wall  # drop warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--configs", default="128x256,256x1024",
                        help="comma-separated BATCHxHIDDEN model sizes, each measured in the same run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    arms = ["plain", "engine+history"]
    per_config = []
    for config in args.configs.split(","):
        batch_size, hidden = (int(v) for v in config.split("x"))
        steps: dict[str, list[float]] = {a: [] for a in arms}
        walls: dict[str, list[float]] = {a: [] for a in arms}
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                t, wall = run_arm(arm, args.epochs, batch_size, hidden)
                steps[arm] += t
                walls[arm].append(wall)
            print(f"[{config}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{a} median step {1e3 * statistics.median(steps[a]):.3f} ms" for a in arms), flush=True)
        med = {a: statistics.median(steps[a]) for a in arms}
        per_config.append({
            "batch_size": batch_size,
            "hidden": hidden,
            "steps_per_arm": {a: len(steps[a]) for a in arms},
            "median_step_ms": {a: round(1e3 * med[a], 4) for a in arms},
            "step_time_ratio": round(med["engine+history"] / med["plain"], 4),
            "fit_wall_ratio": round(statistics.median(walls["engine+history"]) / statistics.median(walls["plain"]), 4),
        })
    result = {
        "benchmark": "overhead",
        "command": "python benchmarks/overhead.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": args.threads,
        "configs": per_config,
        "history_bytes_per_sample": SampleLossStore(1_000_000).bytes_per_sample(),
        "history_bytes_per_sample_with_trace_10": SampleLossStore(1000, trace_epochs=10).bytes_per_sample(True),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
