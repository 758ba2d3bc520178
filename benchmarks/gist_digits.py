"""GIST on the embedded digits task: margin sweep and ablations, mean ± std over seeds.

Arms (same model, data, epochs, τ and batch size; only the negatives differ):

* ``mnrl``: plain in-batch InfoNCE;
* ``blocks_only``: GIST's extra AA/PP blocks with a one-hot-by-sample-index guide, which flags
  nothing but the self-similarities (``mask_self``): the effect of the blocks alone;
* ``filter_only``: the LDA guide's filtering on AP only (``contrast_anchors/positives=False``);
* ``gist_m{margin}``: full GIST (blocks + filtering) at each margin.

    python benchmarks/gist_digits.py            # writes benchmarks/results/gist_digits.json
    python benchmarks/gist_digits.py --seeds 0 1 2 --margins 0.1 0.3 0.6 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl

from lightning_select import GuidedNegatives, SelectionEngine
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule

from common import OneHotGuide  # noqa: E402


def run(arm: str, seed: int, epochs: int, batch_size: int, margin: float) -> dict[str, float]:
    pl.seed_everything(seed)
    callbacks: list[pl.Callback] = [SelectionEngine()]
    if arm == "blocks_only":
        callbacks.append(GuidedNegatives(OneHotGuide(1437), "index", "index", margin=0.0, mask_self=True, cache=None))
    elif arm == "filter_only":
        callbacks.append(GuidedNegatives(DigitsLDAGuide.fit(seed=seed), "image", "image", margin=margin,
                                         contrast_anchors=False, contrast_positives=False))
    elif arm.startswith("gist"):
        callbacks.append(GuidedNegatives(DigitsLDAGuide.fit(seed=seed), "image", "image", margin=margin))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         check_val_every_n_epoch=epochs)
    start = time.perf_counter()
    trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=batch_size, seed=seed))
    metrics = {k.split("/")[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("heldout/")}
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.3, 0.6, 0.8])
    parser.add_argument("--filter-margin", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gist_digits.json")
    args = parser.parse_args()

    arms = [("mnrl", 0.0), ("blocks_only", 0.0), ("filter_only", args.filter_margin)]
    arms += [(f"gist_m{m}", m) for m in args.margins]
    table = {}
    for arm, margin in arms:
        runs = [run(arm, s, args.epochs, args.batch_size, margin) for s in args.seeds]
        table[arm] = {
            key: {"mean": statistics.mean(r[key] for r in runs), "std": statistics.pstdev(r[key] for r in runs)}
            for key in runs[0]
        }
        print(f"{arm:14s} " + "  ".join(f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in table[arm].items()),
              flush=True)
    result = {"benchmark": "gist_digits", "command": "python benchmarks/gist_digits.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), "seeds": args.seeds, "results": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
