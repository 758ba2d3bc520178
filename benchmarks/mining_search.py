"""Offline hard-negative mining on Quora: search backends, HNSW recall, and gold false negatives.

Data: the Quora training split of ``QuoraDuplicatesDataModule`` (20k pairs, split seed 0). Anchors
are the training anchors, the corpus is the training positives (negative ``j`` of anchor ``i`` =
the positive text of pair ``j``). Embeddings: the offline all-MiniLM-L6-v2 guide (read from the
guide-embedding disk cache ``benchmarks/.cache/quora`` that the GIST benchmarks fill, when it holds
this guide's embeddings; computed otherwise) and the tiny static student.

Measured:
  search      wall time of the mining search (20k anchors x 20k corpus, k = candidate pool + 1) for
              faiss exact (IndexFlatIP), faiss HNSW (build and search) and torch exact (chunked matmul
              + topk); median of --repeats runs
  recall      HNSW recall@k against exact search, at several efSearch values
  mining      for the guide and the student as miners: the share of mined negatives that are gold
              false negatives (same duplicate cluster as the anchor) without the guide filter and
              with absolute and relative margins, plus the share of candidates the guide dropped and
              the rows left short

    python benchmarks/mining_search.py
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

import torch  # noqa: E402

from lightning_select.data import QuoraDuplicatesDataModule  # noqa: E402
from lightning_select.guides import GuideEmbeddingCache, load_guide, module_fingerprint  # noqa: E402
from lightning_select.mining import embed_texts, gold_false_negative_share, select_negatives, text_ids  # noqa: E402
from lightning_select.models import StaticEmbeddingEncoder  # noqa: E402
from lightning_select.samplers.search import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, nearest_neighbours  # noqa: E402

MARGINS = [("absolute", 0.0), ("absolute", 0.05), ("absolute", 0.1), ("relative", 0.05), ("relative", 0.1),
           ("relative", 0.2)]


def guide_embeddings(guide, anchors: list[str], positives: list[str], cache_dir: Path) -> tuple[torch.Tensor, ...]:
    """``[N, G]`` guide embeddings of anchors and positives, through the GIST benchmarks' disk cache when it fits."""
    fingerprint = module_fingerprint(guide)
    meta = cache_dir / "meta.json"
    usable = meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fingerprint and \
        json.loads(meta.read_text()).get("num_samples") == len(anchors)
    if not usable:
        print(f"no usable guide cache in {cache_dir.name}: embedding {2 * len(anchors)} texts", flush=True)
        both = embed_texts(guide, anchors + positives, 256, "guide")
        return both[: len(anchors)], both[len(anchors):]
    cache = GuideEmbeddingCache(len(anchors), 2, torch.float32, cache_dir, fingerprint)
    out = []
    for column, texts in enumerate((anchors, positives)):
        idx = torch.arange(len(texts))
        out.append(cache.get_or_compute(column, idx, lambda rows, t=texts: guide([t[r] for r in rows.tolist()])))
    check = torch.nn.functional.normalize(guide(anchors[:16]), dim=1)
    assert torch.allclose(check, torch.nn.functional.normalize(out[0][:16], dim=1), atol=1e-4), "stale guide cache"
    print(f"guide cache: {cache.hits} hits, {cache.misses} misses", flush=True)
    return out[0], out[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    return hits / exact.numel()


def hnsw_sweep(queries: torch.Tensor, corpus: torch.Tensor, exact_ids: torch.Tensor, k: int) -> dict:
    """Build the default HNSW index once (timed), then search at several efSearch values (timed)."""
    import faiss

    unit = lambda x: torch.nn.functional.normalize(x.float(), dim=1).numpy()  # noqa: E731
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(corpus.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(unit(corpus))
    out = {"build_seconds": time.perf_counter() - start}
    q = unit(queries)
    for ef in (16, 32, 64, 128, 256):
        index.hnsw.efSearch = max(ef, k)
        start = time.perf_counter()
        _, ids = index.search(q, k)
        out[str(ef)] = {"search_seconds": time.perf_counter() - start,
                        f"recall@{k}": recall(torch.from_numpy(ids), exact_ids)}
        print(f"hnsw efSearch={ef:3d} {json.dumps(out[str(ef)])}", flush=True)
    print(f"hnsw build {out['build_seconds']:.1f}s", flush=True)
    return out


def scale_point(dm, student, corpus_size: int, num_queries: int, k: int, repeats: int) -> dict:
    """Exact vs HNSW where HNSW pays: student embeddings (128-d) of ``corpus_size`` distinct Quora questions."""
    import pandas as pd

    from lightning_select.data.files import QUORA_FILE, read_quora_tsv, require_file

    df = read_quora_tsv(require_file(dm.data_dir, QUORA_FILE))
    texts = pd.concat([df["question1"], df["question2"]]).astype(str).drop_duplicates().tolist()[:corpus_size]
    corpus = embed_texts(student, texts, 8192, "student: questions")
    queries = corpus[torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:num_queries]]
    t_exact, (_, ex_ids) = timed(lambda: nearest_neighbours(queries, corpus, k, backend="faiss"), repeats)
    t_torch, _ = timed(lambda: nearest_neighbours(queries, corpus, k, backend="torch"), repeats)
    sweep = hnsw_sweep(queries, corpus, ex_ids, k)
    out = {"corpus": len(texts), "queries": num_queries, "dim": int(corpus.shape[1]),
           "faiss_exact_seconds": t_exact, "torch_exact_seconds": t_torch, "hnsw": sweep}
    print(f"scale {json.dumps({k_: v for k_, v in out.items() if k_ != 'hnsw'})}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--cache-dir", default=str(Path(__file__).parent / ".cache" / "quora"))
    parser.add_argument("--candidate-pool", type=int, default=20, help="the pool of the search timings")
    parser.add_argument("--num-negatives", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--pools", type=int, nargs="+", default=[20, 100], help="candidate pools (guide miner)")
    parser.add_argument("--scale-corpus", type=int, default=200000, help="questions in the scale point (0: skip)")
    parser.add_argument("--scale-queries", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mining_search.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)

    dm = QuoraDuplicatesDataModule(data_dir=args.data_dir, max_train_pairs=20000, seed=0)
    dm.setup("fit")
    table = dm.train_set.dataset
    anchors, positives = list(table.anchors), list(table.positives)
    n = len(anchors)
    guide = load_guide("minilm").eval()
    g_anchor, g_corpus = guide_embeddings(guide, anchors, positives, Path(args.cache_dir))
    student = StaticEmbeddingEncoder.from_pretrained(Path(args.data_dir) / "models" / "minilm-l6-m2v-128d").eval()
    s_anchor, s_corpus = embed_texts(student, anchors + positives, 4096, "student").split(n)
    k = args.candidate_pool + 1

    # ---- search backends (guide embeddings, 384-d)
    search: dict[str, dict] = {}
    t_exact, (ex_scores, ex_ids) = timed(lambda: nearest_neighbours(g_anchor, g_corpus, k, backend="faiss"),
                                         args.repeats)
    search["faiss_exact"] = {"seconds": t_exact, f"recall@{k}": 1.0}
    t_torch, (torch_scores, torch_ids) = timed(lambda: nearest_neighbours(g_anchor, g_corpus, k, backend="torch"),
                                               args.repeats)
    # exact ties (repeated Quora texts embed identically) may be ordered differently: compare sets and scores
    search["torch_exact"] = {"seconds": t_torch, f"recall@{k}": recall(torch_ids, ex_ids),
                             "max_score_difference": float((torch_scores - ex_scores).abs().max())}
    t_hnsw, (_, hnsw_ids) = timed(lambda: nearest_neighbours(g_anchor, g_corpus, k, "hnsw"), args.repeats)
    search["faiss_hnsw"] = {"seconds": t_hnsw, f"recall@{k}": recall(hnsw_ids, ex_ids),
                            "recall@10": recall(hnsw_ids[:, :10], ex_ids[:, :10])}
    for name, row in search.items():
        print(f"search {name:12s} {json.dumps(row)}", flush=True)
    ef_sweep = hnsw_sweep(g_anchor, g_corpus, ex_ids, k)
    scale = {}
    if args.scale_corpus:
        scale = scale_point(dm, student, args.scale_corpus, args.scale_queries, k, args.repeats)

    # ---- mining: gold false negatives with and without the guide filter
    a_text, c_text = text_ids(anchors, positives)
    clusters = dm.train_clusters
    mining: dict[str, dict] = {}
    for miner, (qa, qc) in {"guide": (g_anchor, g_corpus), "student": (s_anchor, s_corpus)}.items():
        for pool in args.pools:
            scores, ids = nearest_neighbours(qa, qc, pool + 1, backend="faiss")  # as mine_hard_negatives searches
            for num in args.num_negatives:
                for strategy, margin in [("none", None)] + MARGINS:
                    guide_kw = {} if margin is None else dict(guide_anchor=g_anchor, guide_corpus=g_corpus,
                                                               margin=margin, margin_strategy=strategy)
                    mined = select_negatives(scores, ids, torch.arange(n), num, candidate_pool=pool,
                                             anchor_text_ids=a_text, corpus_text_ids=c_text, **guide_kw)
                    arm = "no filter" if margin is None else f"{strategy} {margin}"
                    row = {"gold_false_negative_share": gold_false_negative_share(mined.ids, clusters),
                           "mean_negative_score": float(mined.scores.nanmean()), **mined.stats}
                    mining.setdefault(miner, {}).setdefault(f"pool {pool}, K {num}", {})[arm] = row
                    print(f"{miner:7s} pool={pool} K={num} {arm:14s} gold FN {row['gold_false_negative_share']:.4f} "
                          f"dropped {row['dropped_share']:.4f} short {int(row['rows_short'])}", flush=True)

    out = {"benchmark": "mining_search", "command": "python benchmarks/mining_search.py",
           "dataset": "quora train split (max_train_pairs=20000, seed=0)", "num_pairs": n,
           "candidate_pools": args.pools, "search_k": k, "threads": args.threads, "repeats": args.repeats,
           "guide": "all-MiniLM-L6-v2 (384-d)", "student": "minilm-l6-m2v-128d (128-d)",
           "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}, "search": search,
           "hnsw_ef_sweep": ef_sweep, "scale": scale, "mining": mining}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out) + "\n")


def markdown(out: dict) -> str:
    k = out["search_k"]
    lines = [f"# Hard-negative mining on Quora ({out['num_pairs']} training pairs)", "",
             "Reproduce: `python benchmarks/mining_search.py`. Timings: " + f"{out['threads']} CPU threads on a "
             "shared machine (other jobs running), median of " + f"{out['repeats']} runs; noisy to about ±30%.", "",
             f"## Search for the mining step ({out['num_pairs']} anchors x {out['num_pairs']} positives, guide "
             f"embeddings 384-d, k = {k})", "",
             f"| search | seconds (build + search) | recall@{k} vs faiss exact |", "|---|---|---|"]
    for name, row in out["search"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row[f'recall@{k}']:.4f} |")
    sweep = out["hnsw_ef_sweep"]
    lines += ["", f"HNSW (M = {out['hnsw']['M']}, efConstruction = {out['hnsw']['efConstruction']}): build "
              f"{sweep['build_seconds']:.1f} s, then by efSearch:", "", f"| efSearch | search seconds | recall@{k} |",
              "|---|---|---|"]
    lines += [f"| {ef} | {r['search_seconds']:.2f} | {r[f'recall@{k}']:.4f} |" for ef, r in sweep.items()
              if ef != "build_seconds"]
    if out.get("scale"):
        sc = out["scale"]
        lines += ["", f"## Scale point: {sc['queries']} queries x {sc['corpus']} Quora questions (student "
                  f"embeddings, {sc['dim']}-d, k = {k})", "",
                  f"faiss exact {sc['faiss_exact_seconds']:.2f} s, torch exact {sc['torch_exact_seconds']:.2f} s; "
                  f"HNSW build {sc['hnsw']['build_seconds']:.1f} s, then:", "",
                  f"| efSearch | search seconds | recall@{k} |", "|---|---|---|"]
        lines += [f"| {ef} | {r['search_seconds']:.3f} | {r[f'recall@{k}']:.4f} |" for ef, r in sc["hnsw"].items()
                  if ef != "build_seconds"]
    lines += ["", "## Gold false negatives among the mined negatives", "",
              "Gold FN share: mined negatives (over the ids found, not the `-1` slots) in the anchor's Quora "
              "duplicate cluster. Dropped: share of the candidate pool the guide removed. Rows short: anchors left "
              "with fewer than K negatives (the datamodule fills them with a seeded random pair), so a small pool "
              "hides its hardest rows from the share. Margins: absolute θ = t − m, relative θ = t − |t|·m; the "
              "guide is all-MiniLM-L6-v2 in every filtered row, also when it is the miner.", "",
              "| miner | pool, K | guide filter | gold FN share | dropped | rows short | mean miner cosine |",
              "|---|---|---|---|---|---|---|"]
    for miner, settings in out["mining"].items():
        for setting, arms in settings.items():
            for arm, r in arms.items():
                lines.append(f"| {miner} | {setting} | {arm} | {r['gold_false_negative_share']:.4f} | "
                             f"{r['dropped_share']:.4f} | {int(r['rows_short'])} | {r['mean_negative_score']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
