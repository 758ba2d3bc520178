"""Quality of GIST against in-batch baselines on Quora and SICK, mean ± std over seeds.

Fixed for every arm: the tiny static student (minilm-l6-m2v-128d), the number of epochs, τ = 0.05
(unless the arm says otherwise), batch size 64 (unless it says otherwise), AdamW lr 2e-3 and the
data split (split seed 0). The student starts from the same pretrained static weights, so a seed
changes the data order (and the sampler's batches). The guide is all-MiniLM-L6-v2 (offline copy).

Arms:
  mnrl               plain in-batch InfoNCE (MultipleNegativesRankingLoss semantics)
  nodup              MNRL with the duplicate-free batch sampler (same text/cluster never twice in a batch)
  gist_live          GIST, guide run live every step (no cache)
  gist_cache         GIST with the guide-embedding cache (precomputed once, shared on disk)
  gist_blocks_only   GIST's AA/PP blocks but a guide that flags nothing (one-hot by sample): blocks alone
  gist_filter_only   the guide's filtering on AP only (contrast_anchors/positives off): filtering alone
  gist_tau0.01       GIST at the reference default τ = 0.01
  mnrl_bs256, gist_bs256   the same epochs at batch 256 (denser false negatives, fewer steps)

Metrics: held-out retrieval (nDCG@10, MRR@10, Recall@1/10; Quora split by duplicate cluster, SICK
test pairs with relatedness >= 4), STSb test Spearman, and on Quora the precision/recall of the
guide's AP flags against gold cluster membership.

    python benchmarks/gist_quality.py                         # both datasets, 3 seeds
    python benchmarks/gist_quality.py --datasets sick --seeds 0 --arms mnrl gist_cache
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_select import FalseNegativeAudit, GuidedNegatives, SelectionEngine, load_guide  # noqa: E402
from lightning_select.data import QuoraDuplicatesDataModule, SickDataModule, load_stsb  # noqa: E402
from lightning_select.evaluation import sts_spearman  # noqa: E402
from lightning_select.models import TextEmbeddingModule  # noqa: E402

from common import OneHotGuide  # noqa: E402

ARMS = ["mnrl", "nodup", "gist_live", "gist_cache", "gist_blocks_only", "gist_filter_only", "gist_tau0.01",
        "mnrl_bs256", "gist_bs256"]


def make_datamodule(dataset: str, data_dir: str, batch_size: int, seed: int, **options):
    """The text benchmarks' data: Quora (20k training pairs, 1000 held-out clusters) or SICK, split with seed 0;
    the run's ``seed`` sets the data order. ``options`` go to the datamodule (``no_duplicates``, ``negatives_path``;
    a ``batch_sampler`` may also be set on the result after ``setup``, when it needs the training-set size)."""
    if dataset == "quora":
        dm = QuoraDuplicatesDataModule(data_dir=data_dir, batch_size=batch_size, seed=0,
                                       max_train_pairs=20000, test_clusters=1000, **options)
    else:
        dm = SickDataModule(data_dir=data_dir, batch_size=batch_size, seed=0, **options)
    dm.setup("fit")  # the split uses seed 0 for every run ...
    dm.seed = seed  # ... the data order uses the run's seed
    return dm


def text_parser(doc: str, out_name: str, datasets: list[str]) -> argparse.ArgumentParser:
    """The options every text benchmark shares (data, datasets, seeds, epochs, guide cache, result file)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=datasets)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sick-epochs", type=int, default=5)
    parser.add_argument("--quora-epochs", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(Path(__file__).parent / ".cache"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{out_name}.json")
    return parser


def fit_and_evaluate(model: TextEmbeddingModule, dm, callbacks: list, epochs: int, stsb) -> dict[str, float]:
    """Fit on CPU for ``epochs`` (validating once, at the end; no logger, checkpoints or progress bar); return
    the held-out retrieval metrics, the STSb test Spearman and the fit's wall clock."""
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         check_val_every_n_epoch=epochs)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    metrics = {k.split("/")[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("heldout/")}
    model.eval()
    with torch.no_grad():
        metrics["stsb_spearman"] = sts_spearman(model.encoder(stsb[0]), model.encoder(stsb[1]), stsb[2])
    metrics["train_seconds"] = seconds
    return metrics


def run(dataset: str, arm: str, seed: int, args, guide, stsb) -> dict[str, float]:
    pl.seed_everything(seed)
    batch_size = 256 if arm.endswith("bs256") else 64
    temperature = 0.01 if arm == "gist_tau0.01" else 0.05
    dm = make_datamodule(dataset, args.data_dir, batch_size, seed, no_duplicates=arm == "nodup")
    model = TextEmbeddingModule(student_path=os.path.join(args.data_dir, "models", "minilm-l6-m2v-128d"),
                                temperature=temperature, lr=2e-3)
    callbacks: list[pl.Callback] = [SelectionEngine()]
    gist = None
    cache_dir = str(Path(args.cache_dir) / dataset)
    if arm == "gist_live":
        gist = GuidedNegatives(guide, "anchor", "positive", cache=None)
    elif arm == "gist_blocks_only":
        gist = GuidedNegatives(OneHotGuide(len(dm.train_set)), "index", "index", mask_self=True, cache=None)
    elif arm.startswith("gist"):
        gist = GuidedNegatives(guide, "anchor", "positive", cache="disk", cache_dir=cache_dir, precompute=True,
                               contrast_anchors=arm != "gist_filter_only", contrast_positives=arm != "gist_filter_only")
    audit = None
    if gist is not None:
        callbacks.append(gist)
        if dataset == "quora" and arm in ("gist_cache", "gist_bs256"):
            audit = FalseNegativeAudit(key="anchor_cluster", positive_key="positive_cluster")
            callbacks.append(audit)
    metrics = fit_and_evaluate(model, dm, callbacks, args.epochs[dataset], stsb)
    if audit is not None:  # the AP block's flags against the gold duplicate clusters
        ap = audit.summary()
        metrics.update({"fn_precision": ap["ap/precision"], "fn_recall": ap["ap/recall"],
                        "masked_fraction_ap": ap["ap/flagged_fraction"], "gold_fraction_ap": ap["ap/gold_fraction"]})
    return metrics


def seed_summary(runs: list[dict]) -> dict:
    """``{metric: {"mean", "std" (population), "runs"}}`` over the seeds' metric dicts. NaN runs (e.g. the
    precision of a guide that flagged nothing) are left out of mean and std, which are NaN when all are."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        finite = [v for v in values if v == v]
        out[key] = {"mean": statistics.mean(finite) if finite else float("nan"),
                    "std": statistics.pstdev(finite) if finite else float("nan"), "runs": values}
    return out


def main() -> None:
    parser = text_parser(__doc__, "gist_quality", ["sick", "quora"])
    parser.add_argument("--arms", nargs="+", default=ARMS)
    args = parser.parse_args()
    args.epochs = {"sick": args.sick_epochs, "quora": args.quora_epochs}
    torch.set_num_threads(2)
    guide = load_guide("minilm")
    stsb = load_stsb(args.data_dir, "test")
    results: dict = json.loads(args.out.read_text()).get("results", {}) if args.out.exists() else {}
    for dataset in args.datasets:
        for arm in args.arms:
            runs = [run(dataset, arm, s, args, guide, stsb) for s in args.seeds]
            summary = seed_summary(runs)
            results.setdefault(dataset, {})[arm] = summary
            print(f"{dataset:6s} {arm:17s} " + "  ".join(
                f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in summary.items()), flush=True)
            out = {"benchmark": "gist_quality", "command": "python benchmarks/gist_quality.py", "seeds": args.seeds,
                   "epochs": args.epochs, "results": results}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
