"""Batch composition × false-negative handling on Quora and SICK, mean ± std over seeds.

The grid of issue 10: how batches are composed (rows) against what happens to the false negatives
they bring (columns).

  batches   random     seeded shuffling (the GIST benchmark's batches)
            clustered  ClusteredBatchSampler: one k-means cluster of the guide's anchor embeddings per
                       batch (k = N // 80, the probe's 250 on Quora), fed by BatchComposition from the
                       guide-embedding cache (no extra guide pass when GIST runs)
            exclusion  (not in the default grid) NeighbourExclusionBatchSampler: random batches in which no two
                       samples whose guide anchor embeddings have cosine > 0.8 meet (the duplicate-free
                       sampler generalised to guide neighbourhoods)
            reweighted (not in the default grid) ClusterReweightedBatchSampler (Diversify-and-Conquer style): each
                       epoch trains half the pairs, drawn per guide cluster (k = N // 80) with weights
                       ∝ size·exp(mean recent loss / 0.1) from LossHistory, no cluster above 2% of the
                       mass; twice the epochs, so as many samples as one full epoch
            student    (not in the default grid) clustered batches from the *student's* anchor embeddings,
                       re-embedded and re-clustered at every epoch start (refresh_every_n_epochs=1)
            budget     (not in the default grid) the same sampler with T = 1e6: a uniform half per epoch,
                       the reweighting's baseline at the same budget
            mined      random batches plus one mined hard negative per pair (lightning_select.mining:
                       top-20 neighbours by the guide, the guide's false negatives removed with the
                       relative rule at m = 0.05, NV-Retriever's "95% of the positive"); GIST also
                       masks the AN block online
  loss      mnrl       plain in-batch InfoNCE (MultipleNegativesRankingLoss semantics)
            gist       GIST (drop) at the margin chosen by precision/recall against gold
                       (benchmarks/false_negative_margins.py: relative m = 0.1, best F1 on clustered batches)
            gist_m0    GIST (drop) at the reference's strict m = 0 (the habit)
            attract    GIST's flags as extra positives (multi-positive InfoNCE), same margin as gist
            self       self-guide (drop): the student's own similarities, m = −0.1 (Qwen3/pplx rule)

Fixed for every cell, as in benchmarks/gist_quality.py: the static student minilm-l6-m2v-128d, τ = 0.05,
batch 64, AdamW lr 2e-3, split seed 0, 1 epoch on Quora (20k pairs) and 5 on SICK; a seed changes the
data order (and the sampler's batches and clusters). Metrics: held-out nDCG@10 and MRR@10, STSb test
Spearman, the wall clock of the fit (clustering included) and, from FalseNegativeAudit, the in-batch
gold false-negative density of the AP block (and of the AN block for mined negatives), the fraction
GIST flags, its precision and recall, and the gold false negatives it leaves in (share of candidates).
Gold on Quora = same duplicate cluster; on SICK = the same exact sentence (a much weaker gold).
The mining time is reported once per dataset (offline, before training).

    python benchmarks/batch_composition.py                                  # everything, 3 seeds
    python benchmarks/batch_composition.py --datasets quora --seeds 0 --batches clustered --losses gist
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_select import (  # noqa: E402
    BatchComposition,
    FalseNegativeAudit,
    GuidedNegatives,
    LossHistory,
    SelectionEngine,
    load_guide,
)
from lightning_select.data import load_stsb  # noqa: E402
from lightning_select.models import TextEmbeddingModule  # noqa: E402
from lightning_select.samplers import (  # noqa: E402
    ClusteredBatchSampler,
    ClusterReweightedBatchSampler,
    NeighbourExclusionBatchSampler,
)

from gist_quality import fit_and_evaluate, make_datamodule, seed_summary, text_parser  # noqa: E402

BATCHES = ["random", "clustered", "mined"]
EXCLUSION_THRESHOLD = 0.8
LOSSES = ["mnrl", "gist", "gist_m0", "attract", "self"]
CLUSTER_SIZE = 80
GIST_MARGIN = {"margin": 0.1, "margin_strategy": "relative"}
MINING = ["--num-negatives", "1", "--candidate-pool", "20", "--margin", "0.05", "--margin-strategy", "relative",
          "--miner", "guide", "--method", "exact"]


def mine(dataset: str, args) -> tuple[Path, dict]:
    """The mined-negatives file of ``dataset`` (built once, timed) and the miner's statistics."""
    from lightning_select.mining import main as mining_main

    path = Path(args.cache_dir) / f"mined_{dataset}.npz"
    stats_path = path.with_suffix(".json")
    if not path.exists():
        start = time.perf_counter()
        stats = mining_main(["--dataset", dataset, "--data-dir", args.data_dir, "--out", str(path), *MINING])
        stats = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        stats["mining_seconds"] = time.perf_counter() - start
        stats_path.write_text(json.dumps(stats, indent=2))
    return path, json.loads(stats_path.read_text())


def composition_sampler(batches: str, num_clusters: int, mix: float):
    """The batch-sampler factory of a ``batches`` arm (None: the datamodule's seeded shuffling)."""
    if batches in ("clustered", "student"):
        return partial(ClusteredBatchSampler, num_clusters=num_clusters, mix=mix)
    if batches in ("reweighted", "budget"):
        return partial(ClusterReweightedBatchSampler, num_clusters=num_clusters, budget=0.5,
                       temperature=0.1 if batches == "reweighted" else 1e6, max_cluster_share=0.02)
    if batches == "exclusion":
        return partial(NeighbourExclusionBatchSampler, threshold=EXCLUSION_THRESHOLD)
    return None


def run(dataset: str, batches: str, loss: str, seed: int, args, guide, stsb, mined_path) -> dict[str, float]:
    pl.seed_everything(seed)
    mined = batches == "mined"
    dm = make_datamodule(dataset, args.data_dir, 64, seed, negatives_path=str(mined_path) if mined else None)
    dm.batch_sampler = composition_sampler(batches, max(len(dm.train_set) // CLUSTER_SIZE, 2), args.mix)
    negative_keys = ("negative_0",) if mined else ()
    model = TextEmbeddingModule(student_path=os.path.join(args.data_dir, "models", "minilm-l6-m2v-128d"),
                                temperature=0.05, lr=2e-3, negative_keys=negative_keys)
    cache_dir = str(Path(args.cache_dir) / (f"{dataset}_mined" if mined else dataset))
    callbacks: list[pl.Callback] = [SelectionEngine()]
    gist_kw = dict(anchor_column="anchor", positive_column="positive", negative_columns=list(negative_keys))
    model_guide = loss in ("gist", "gist_m0", "attract")
    if model_guide:
        margin = {"margin": 0.0, "margin_strategy": "absolute"} if loss == "gist_m0" else GIST_MARGIN
        callbacks.append(GuidedNegatives(guide, **gist_kw, **margin, cache="disk", cache_dir=cache_dir,
                                         precompute=True, false_negatives="attract" if loss == "attract" else "drop"))
    elif loss == "self":
        callbacks.append(GuidedNegatives("self", **gist_kw, margin=-0.1))
    if batches in ("reweighted", "budget"):
        callbacks.append(LossHistory())
    if batches == "student":
        callbacks.append(BatchComposition(source="student", refresh_every_n_epochs=1))
    elif batches in ("clustered", "exclusion", "reweighted", "budget"):  # GIST's cache, else its disk cache via a guide
        callbacks.append(BatchComposition(source="guide", columns=["anchor"]) if model_guide else
                         BatchComposition(source="guide", guide=guide, guide_columns=["anchor", "positive"],
                                          columns=["anchor"], cache="disk", cache_dir=cache_dir))
    audit = FalseNegativeAudit(key="anchor_cluster", positive_key="positive_cluster",
                               negative_keys=["negative_0_cluster"] if mined else [])
    callbacks.append(audit)
    epochs = args.epochs[dataset] * (2 if batches in ("reweighted", "budget") else 1)
    metrics = fit_and_evaluate(model, dm, callbacks, epochs, stsb)
    metrics = {k: v for k, v in metrics.items() if k in ("ndcg@10", "mrr@10", "stsb_spearman", "train_seconds")}
    for key, value in audit.summary().items():
        metrics[key.replace("/", "_")] = value
    return metrics


def markdown(record: dict) -> str:
    """The grid as Markdown tables (one per dataset): quality, false negatives and wall clock per cell."""
    lines = ["# Batch composition × false-negative handling", "",
             f"Reproduce: `{record['command']}`. Seeds {record['seeds']}; mean ± std (population) over seeds. "
             "Gold false negatives: Quora = same duplicate cluster, SICK = the same exact sentence. AP = anchor × "
             "in-batch positives (own excluded); left in = gold false negatives the loss still treats as negatives, "
             "as a share of AP candidates. Seconds: the fit, clustering included (mining is offline, below).", ""]
    for dataset, cells in record["results"].items():
        lines += [f"## {dataset}", "",
                  "| batches / loss | nDCG@10 | MRR@10 | STSb ρ | gold FN (AP) | flagged | precision | recall "
                  "| left in "
                  "| AN gold FN | AN flagged | AN left in | fit s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def cell(r: dict, key: str, fmt: str = "{:.4f}", std: bool = False) -> str:
            if key not in r or r[key]["mean"] != r[key]["mean"]:
                return "–"
            return fmt.format(r[key]["mean"]) + (f" ± {r[key]['std']:.4f}" if std else "")

        for name, r in cells.items():
            lines.append(f"| {name} | {cell(r, 'ndcg@10', std=True)} | {cell(r, 'mrr@10')} | "
                         f"{cell(r, 'stsb_spearman')} | {cell(r, 'ap_gold_fraction', '{:.5f}')} | "
                         f"{cell(r, 'ap_flagged_fraction', '{:.5f}')} | {cell(r, 'ap_precision', '{:.3f}')} | "
                         f"{cell(r, 'ap_recall', '{:.3f}')} | {cell(r, 'ap_left_in_fraction', '{:.5f}')} | "
                         f"{cell(r, 'an0_gold_fraction', '{:.4f}')} | {cell(r, 'an0_flagged_fraction', '{:.4f}')} | "
                         f"{cell(r, 'an0_left_in_fraction', '{:.4f}')} | {cell(r, 'train_seconds', '{:.1f}')} |")
        mining = record.get("mining", {}).get(dataset)
        if mining:
            lines += ["", "Mining (offline, once): " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in mining.items())]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = text_parser(__doc__, "batch_composition", ["quora", "sick"])
    parser.add_argument("--batches", nargs="+", default=BATCHES,
                        choices=[*BATCHES, "exclusion", "reweighted", "budget", "student"])
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--mix", type=float, default=0.0, help="share of each clustered batch drawn at random")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md table from the .json and stop")
    args = parser.parse_args()
    if args.markdown_only:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.read_text())))
        return
    args.epochs = {"sick": args.sick_epochs, "quora": args.quora_epochs}
    torch.set_num_threads(2)
    guide = load_guide("minilm")
    stsb = load_stsb(args.data_dir, "test")
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    results, mining = out.get("results", {}), out.get("mining", {})
    for dataset in args.datasets:
        mined_path = None
        if "mined" in args.batches:
            mined_path, mining[dataset] = mine(dataset, args)
        for batches in args.batches:
            for loss in args.losses:
                runs = [run(dataset, batches, loss, s, args, guide, stsb, mined_path) for s in args.seeds]
                summary = seed_summary(runs)
                results.setdefault(dataset, {})[f"{batches}/{loss}"] = summary
                shown = ("ndcg@10", "mrr@10", "stsb_spearman", "train_seconds", "ap_gold_fraction",
                         "ap_flagged_fraction", "ap_precision", "ap_recall", "ap_left_in_fraction")
                print(f"{dataset:6s} {batches:9s} {loss:8s} " + "  ".join(
                    f"{k}={summary[k]['mean']:.4f}±{summary[k]['std']:.4f}" for k in shown if k in summary),
                    flush=True)
                record = {"benchmark": "batch_composition", "command": "python benchmarks/batch_composition.py",
                          "seeds": args.seeds, "epochs": args.epochs, "mix": args.mix, "cluster_size": CLUSTER_SIZE,
                          "gist_margin": GIST_MARGIN, "exclusion_threshold": EXCLUSION_THRESHOLD,
                          "mining_options": MINING, "mining": mining, "results": results}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=2) + "\n")
                args.out.with_suffix(".md").write_text(markdown(record))


if __name__ == "__main__":
    main()
