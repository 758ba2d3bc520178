"""Choose GIST's margin by measured precision and recall against gold, for random and clustered batches.

No training: GIST's flags depend only on the guide's embeddings and on which samples share a batch.
For Quora (20k training pairs, gold = the duplicate clusters) this script composes one epoch of
batches of 64 (random: a seeded permutation; clustered: ``ClusteredBatchSampler`` over k-means of the
guide's anchor embeddings) and, for a grid of margins under both rules, counts the AP candidates
(anchor × other rows' positives) that the MiniLM guide flags against the gold false negatives:
precision, recall, F1, the flagged share, and the share of candidates that stay gold false negatives
(left in). The margin the training benchmark uses is the one with the best F1 on clustered batches.

The guide embeddings are read from the GIST benchmark's disk cache (``benchmarks/.cache/quora``,
written by ``benchmarks/gist_quality.py`` or ``benchmarks/batch_composition.py``); without it the
guide is run once over the training set.

    python benchmarks/false_negative_margins.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_select.data import QuoraDuplicatesDataModule  # noqa: E402
from lightning_select.policies.false_negative_audit import audit_block, audit_summary  # noqa: E402
from lightning_select.rules.gist import false_negative_mask, gist_thresholds  # noqa: E402
from lightning_select.samplers import ClusteredBatchSampler  # noqa: E402

MARGINS = {"absolute": [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3], "relative": [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]}


def guide_embeddings(dm: QuoraDuplicatesDataModule, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, G]`` unit guide embeddings of the anchors and of the positives (the disk cache, else the guide)."""
    meta = cache_dir / "meta.json"
    n = len(dm.train_set)
    if meta.exists() and json.loads(meta.read_text())["num_samples"] == n:
        values = np.load(cache_dir / "values.npy", mmap_mode="r")
        filled = np.load(cache_dir / "filled.npy", mmap_mode="r")
        if bool(np.asarray(filled).all()):
            v = torch.from_numpy(np.array(values, dtype=np.float32))
            return F.normalize(v[:, 0], dim=-1), F.normalize(v[:, 1], dim=-1)
    from lightning_select import load_guide
    from lightning_select.mining import embed_texts

    guide = load_guide("minilm")
    table = dm.train_set.dataset
    return (F.normalize(embed_texts(guide, table.anchors, desc="guide anchors"), dim=-1),
            F.normalize(embed_texts(guide, table.positives, desc="guide positives"), dim=-1))


def sweep(batches: list[list[int]], ga: torch.Tensor, gp: torch.Tensor, clusters: torch.Tensor) -> dict:
    """Flag counts of every margin over ``batches`` (AP block only, own positive excluded)."""
    out: dict = {}
    for strategy, margins in MARGINS.items():
        for m in margins:
            sums = torch.zeros(1, 4, dtype=torch.float64)
            for batch in batches:
                idx = torch.tensor(batch)
                g = ga[idx] @ gp[idx].T
                theta = gist_thresholds(g.diagonal(), m, strategy)
                flagged = false_negative_mask(g, theta)
                gold = clusters[idx].view(-1, 1) == clusters[idx].view(1, -1)
                own = torch.eye(len(batch), dtype=torch.bool)
                sums[0] += audit_block(gold, flagged, own)
            s = audit_summary(sums, ["ap"])
            p, r = s["ap/precision"], s["ap/recall"]
            out[f"{strategy}:{m}"] = {"strategy": strategy, "margin": m, "precision": p, "recall": r,
                                      "f1": 2 * p * r / (p + r) if p == p and r == r and p + r > 0 else float("nan"),
                                      "flagged_fraction": s["ap/flagged_fraction"],
                                      "gold_fraction": s["ap/gold_fraction"],
                                      "left_in_fraction": s["ap/left_in_fraction"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache" / "quora")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cluster-size", type=int, default=80, help="k = N // cluster_size clusters (the probe's 250)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "false_negative_margins.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = QuoraDuplicatesDataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=0, max_train_pairs=20000,
                                   test_clusters=1000)
    dm.setup("fit")
    ga, gp = guide_embeddings(dm, args.cache_dir)
    clusters = dm.train_clusters
    n = ga.shape[0]
    k = n // args.cluster_size
    results: dict = {"benchmark": "false_negative_margins", "command": "python benchmarks/false_negative_margins.py",
                     "num_samples": n, "batch_size": args.batch_size, "num_clusters": k, "compositions": {}}
    random_order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    compositions = {"random": [random_order[a:a + args.batch_size] for a in range(0, n, args.batch_size)]}
    for mix in (0.0, 0.5):
        sampler = ClusteredBatchSampler(n, args.batch_size, num_clusters=k, mix=mix, seed=0)
        start = time.perf_counter()
        sampler.set_embeddings(ga)
        seconds = time.perf_counter() - start
        compositions[f"clustered_mix{mix}"] = list(sampler)
        results.setdefault("kmeans_seconds", seconds)
        results[f"purity_mix{mix}"] = sampler.purity(0)
    for name, batches in compositions.items():
        rows = sweep(batches, ga, gp, clusters)
        results["compositions"][name] = rows
        best = max(rows.values(), key=lambda r: r["f1"] if r["f1"] == r["f1"] else -1)
        print(f"{name:18s} gold={best['gold_fraction']:.5f}  best F1 {best['f1']:.3f} at {best['strategy']} "
              f"m={best['margin']} (precision {best['precision']:.3f}, recall {best['recall']:.3f}, left in "
              f"{best['left_in_fraction']:.5f})", flush=True)
        for key, r in rows.items():
            print(f"    {key:14s} P={r['precision']:.3f} R={r['recall']:.3f} F1={r['f1']:.3f} "
                  f"flagged={r['flagged_fraction']:.5f} left_in={r['left_in_fraction']:.5f}")
    clustered = results["compositions"]["clustered_mix0.0"].values()
    best = max(clustered, key=lambda r: r["f1"] if r["f1"] == r["f1"] else -1)
    results["chosen"] = {"strategy": best["strategy"], "margin": best["margin"], "rule": "best F1 on clustered batches"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"chosen: {results['chosen']}")


if __name__ == "__main__":
    main()
