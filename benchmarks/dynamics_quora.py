"""Quora: how well DBPM's bad-pair flags and GIST's false-negative flags agree with the gold duplicate clusters.

Setting (as ``benchmarks/gist_quality.py``): Quora duplicate questions (20 000 training pairs, split by duplicate
cluster, split seed 0), the tiny static student ``minilm-l6-m2v-128d``, τ = 0.05, batch 64, AdamW lr 2e-3; the guide
all-MiniLM-L6-v2 (cached embeddings). Both runs use the same seed, hence the same batches.

Every training sample ``i`` is a gold duplicate pair ``(anchor_i, positive_i)`` of cluster ``c_i``. Gold, per sample,
recorded during training by :class:`InBatchDuplicates` (an independent callback reading the batches' cluster ids):

* ``gold_in_batch``: anchor ``i`` shared a batch, at least once in the run, with another pair ``j`` of its own cluster
  (so ``positive_j``, a true duplicate of ``anchor_i``, was one of its in-batch *negatives*: a false negative);
* ``gold_count``: how many such in-batch false negatives it met over the run.

Flags, per sample:

* DBPM (``DBPM(warmup_epochs=2)``, 5 epochs; its export, i.e. the rule on each pair's mean loss over the whole run):
  ``faulty`` (mean loss ≥ μ + 3σ) and ``noisy`` (≤ μ − 2σ);
* GIST (``GuidedNegatives``, drop mode, the reference margin, AP/AA/PP blocks; its flagged-pair log): ``flagged``
  when at least one of anchor ``i``'s in-batch positives (the AP block) was flagged as a false negative.

Agreement of a per-sample flag F with gold G = ``gold_in_batch``: precision ``P(G | F)``, recall ``P(F | G)``, the
base rate ``P(G)`` and the lift ``P(G | F) / P(G)``; for DBPM also the ROC-AUC of the mean loss for G (does a high
mean loss mean in-batch duplicates?). For GIST also the pair level: precision and recall of its AP flags against the
gold pairs (candidate of the anchor's cluster), as ``FalseNegativeAudit`` defines them. And the overlap of DBPM's
faulty set with GIST's flagged set.

    python benchmarks/dynamics_quora.py --epochs 5

Writes ``benchmarks/results/dynamics_quora.json`` and ``dynamics_quora.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_select import DBPM, GuidedNegatives, SelectionEngine, load_guide  # noqa: E402
from lightning_select.data import QuoraDuplicatesDataModule  # noqa: E402
from lightning_select.models import TextEmbeddingModule  # noqa: E402
from lightning_select.rules.dynamics import roc_auc  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class InBatchDuplicates(pl.Callback):
    """Per training sample: how many other rows of its own duplicate cluster shared its batches (gold)."""

    def __init__(self, num_samples: int) -> None:
        self.count = torch.zeros(num_samples, dtype=torch.long)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cluster = batch["anchor_cluster"].cpu()
        same = cluster.view(-1, 1) == cluster.view(1, -1)
        same.fill_diagonal_(False)
        self.count.index_add_(0, batch["index"].cpu(), same.sum(1))


def agreement(flag: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Precision P(G | F), recall P(F | G), base rate P(G), lift, and the counts."""
    flagged, positives = int(flag.sum()), int(gold.sum())
    hits = int((flag & gold).sum())
    base = positives / gold.numel()
    precision = hits / flagged if flagged else float("nan")
    return {"flagged": flagged, "gold": positives, "hits": hits, "precision": precision,
            "recall": hits / positives if positives else float("nan"), "base_rate": base,
            "lift": precision / base if flagged and base else float("nan")}


def datamodule(args: argparse.Namespace, seed: int) -> QuoraDuplicatesDataModule:
    dm = QuoraDuplicatesDataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=0,
                                   max_train_pairs=args.train_pairs, test_clusters=1000)
    dm.setup("fit")  # the split uses seed 0 ...
    dm.seed = seed  # ... the data order the run's seed
    return dm


def run(args: argparse.Namespace, arm: str, guide: Any = None) -> dict[str, Any]:
    pl.seed_everything(args.seed)
    dm = datamodule(args, args.seed)
    n = len(dm.train_set)
    gold = InBatchDuplicates(n)
    model = TextEmbeddingModule(student_path=os.path.join(args.data_dir, "models", "minilm-l6-m2v-128d"),
                                temperature=0.05, lr=2e-3)
    if arm == "dbpm":
        policy: Any = DBPM(warmup_epochs=args.warmup_epochs)
    else:
        policy = GuidedNegatives(guide, "anchor", "positive", cache="disk", cache_dir=args.cache_dir,
                                 precompute=True, record_flagged_pairs=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[SelectionEngine(), policy, gold],
                         check_val_every_n_epoch=args.epochs)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    metrics = {k.split("/")[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("heldout/")}
    g = gold.count > 0
    out: dict[str, Any] = {"arm": arm, "fit_s": round(seconds, 1), "heldout": metrics, "num_samples": n,
                           "gold_rows_met_per_sample_mean": float(gold.count.double().mean())}
    clusters = dm.train_clusters
    sizes = torch.bincount(clusters)[clusters]
    out["static_gold_share"] = float((sizes > 1).double().mean())  # pairs whose cluster has another training pair
    if arm == "dbpm":
        export = Path(args.work_dir) / "dbpm.parquet"
        policy.export(export)
        import pandas as pd

        table = pd.read_parquet(export)
        meta = json.loads(export.with_suffix(".json").read_text())
        flag, m = torch.tensor(table["flag"].to_numpy()), torch.tensor(table["mean_loss"].to_numpy())
        out.update(mu=meta["mu"], sigma=meta["sigma"], faulty=agreement(flag == 2, g), noisy=agreement(flag == 1, g),
                   mean_loss_auc_for_gold=roc_auc(m, g), flags=flag)
        out["faulty_static"] = agreement(flag == 2, sizes > 1)
    else:
        pairs = policy.flagged_pairs()
        ap = pairs["block"] == 0
        anchors, candidates = pairs["anchor_index"][ap].long(), pairs["candidate_index"][ap].long()
        flagged = torch.zeros(n, dtype=torch.bool)
        flagged[anchors] = True
        true_pairs = int((clusters[anchors] == clusters[candidates]).sum())
        out.update(flagged_sample=agreement(flagged, g), flags=flagged,
                   pair_level={"flagged_pairs": int(ap.sum()), "true_pairs": true_pairs,
                               "precision": true_pairs / max(int(ap.sum()), 1),
                               "recall": true_pairs / max(int(gold.count.sum()), 1),
                               "gold_pairs": int(gold.count.sum())})
    out["gold"] = g
    return out


def markdown(payload: dict[str, Any]) -> str:
    d, g = payload["dbpm"], payload["gist"]
    s = payload["settings"]
    fmt = lambda a: (f"{a['flagged']} | {a['precision']:.3f} | {a['recall']:.3f} | {a['base_rate']:.3f} | "  # noqa: E731
                     f"{a['lift']:.2f}")
    return "\n".join([
        "# DBPM and GIST flags against the gold Quora duplicate clusters", "",
        f"Generated by `benchmarks/dynamics_quora.py` (definitions in its docstring). Reproduce: `{payload['command']}`. "
        f"{s['train_pairs']} training pairs, batch {s['batch_size']}, {s['epochs']} epochs, seed {s['seed']} (one seed); "
        f"DBPM warm-up {s['warmup_epochs']} epochs. Gold G: the anchor met at least one pair of its own duplicate "
        "cluster in its batches during the run (an in-batch false negative). Both runs had the same batches.", "",
        "| flag (per sample) | flagged | precision P(G given F) | recall P(F given G) | base rate P(G) | lift |",
        "|---|---|---|---|---|---|",
        f"| DBPM faulty (mean loss ≥ μ + 3σ) | {fmt(d['faulty'])} |",
        f"| DBPM noisy (mean loss ≤ μ − 2σ) | {fmt(d['noisy'])} |",
        f"| GIST (≥ 1 AP candidate flagged) | {fmt(g['flagged_sample'])} |", "",
        f"- DBPM: ROC-AUC of the per-pair mean loss for G: {d['mean_loss_auc_for_gold']:.3f}; μ = {d['mu']:.3f}, "
        f"σ = {d['sigma']:.3f}. Held-out nDCG@10 {d['heldout'].get('ndcg@10', float('nan')):.4f} ({d['fit_s']:.0f} s).",
        f"- GIST pair level (AP block): {g['pair_level']['flagged_pairs']} flagged pairs, precision "
        f"{g['pair_level']['precision']:.3f}, recall {g['pair_level']['recall']:.3f} of the "
        f"{g['pair_level']['gold_pairs']} gold in-batch false negatives. Held-out nDCG@10 "
        f"{g['heldout'].get('ndcg@10', float('nan')):.4f} ({g['fit_s']:.0f} s).",
        f"- Overlap: {payload['overlap']['both']} samples are both DBPM-faulty and GIST-flagged (Jaccard "
        f"{payload['overlap']['jaccard']:.3f}).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--cache-dir", default=None, help="guide-embedding cache folder (default: a temp folder)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-pairs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    import tempfile

    args.work_dir = tempfile.mkdtemp(prefix="dynamics_quora_")
    args.cache_dir = args.cache_dir or os.path.join(args.work_dir, "guide_cache")
    folders = ("--data-dir", "--cache-dir", "--out-dir")  # no machine paths in the recorded command
    argv = [a for i, a in enumerate(sys.argv[1:], 1) if a not in folders and sys.argv[i - 1] not in folders]
    dbpm = run(args, "dbpm")
    print({k: v for k, v in dbpm.items() if k not in ("flags", "gold")}, flush=True)
    guide = load_guide("minilm")  # the offline all-MiniLM-L6-v2 copy, as benchmarks/gist_quality.py
    gist = run(args, "gist", guide)
    print({k: v for k, v in gist.items() if k not in ("flags", "gold")}, flush=True)
    assert torch.equal(dbpm["gold"], gist["gold"]), "the two runs did not see the same batches"
    faulty, flagged = dbpm.pop("flags") == 2, gist.pop("flags")
    both, either = int((faulty & flagged).sum()), int((faulty | flagged).sum())
    dbpm.pop("gold"), gist.pop("gold")
    payload = {"command": "python benchmarks/dynamics_quora.py " + " ".join(shlex.quote(a) for a in argv),
               "settings": {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size", "train_pairs", "seed")},
               "dbpm": dbpm, "gist": gist, "overlap": {"both": both, "jaccard": both / max(either, 1)}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "dynamics_quora.json").write_text(json.dumps(payload, indent=1))
    (args.out_dir / "dynamics_quora.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
