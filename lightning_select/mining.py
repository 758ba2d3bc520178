"""Offline hard-negative mining with guide-based false-negative removal, and the negatives file.

The idea of sentence-transformers' ``mine_hard_negatives``: embed the anchors and a corpus (here the
training positives) with a *miner* (the guide or the student), take each anchor's nearest corpus
entries as candidate negatives, and keep the best ones. The nearest entries are often paraphrases
of the anchor, i.e. false negatives, so a *guide* removes them with the GIST rule
(:func:`~lightning_select.rules.gist.gist_thresholds`): with the guide's anchor–positive similarity
``t``, a candidate ``c`` is dropped when

* ``"absolute"``: ``g(a, c) > t − m``
* ``"relative"``: ``g(a, c) > t − |t|·m``  (NV-Retriever's "95% of the positive" is ``m = 0.05``)

The result is written to a ``.npz`` negatives file tied to the training texts by a fingerprint;
``QuoraDuplicatesDataModule(negatives_path=...)`` / ``SickDataModule(negatives_path=...)`` read it
and add the text columns ``negative_0 … negative_{K-1}`` to every training item. Mine from the
command line (``python -m lightning_select.mining --help``).

Example::

    >>> import torch
    >>> anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    >>> mined = mine_hard_negatives(anchors, anchors.clone(), torch.arange(3), 1, candidate_pool=2,
    ...                             backend="torch")
    >>> mined.ids.tolist()
    [[2], [2], [0]]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_select.rules.gist import MARGIN_STRATEGIES, MarginStrategy, false_negative_mask, gist_thresholds
from lightning_select.samplers.search import METHODS, SearchBackend, SearchMethod, nearest_neighbours

_WHO = "mine_hard_negatives"
#: Anchors per chunk of the candidate scoring (bounds the ``[chunk, P, G]`` and ``[chunk, P, P]`` temporaries).
_CHUNK = 512
NEGATIVES_FORMAT = 1


@dataclass
class MinedNegatives:
    """``ids [N, K]`` corpus ids of the negatives (``-1`` where fewer remain), ``scores [N, K]`` their
    miner cosines (NaN where ``-1``) and ``stats`` (see :func:`select_negatives`)."""

    ids: Tensor
    scores: Tensor
    stats: dict[str, float] = field(default_factory=dict)


def text_ids(*columns: Sequence[str]) -> list[Tensor]:
    """One integer id per distinct text, shared across ``columns`` (equal ids iff equal texts).

    Example::

        >>> [t.tolist() for t in text_ids(["a", "b"], ["b", "c", "a"])]
        [[0, 1], [1, 2, 0]]
    """
    vocab: dict[str, int] = {}
    return [torch.tensor([vocab.setdefault(t, len(vocab)) for t in col], dtype=torch.int64) for col in columns]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{_WHO}: expected `{name}` to be an int >= {minimum}, but got {value!r}.")
    return int(value)


def _check_ids(name: str, ids: Any, rows: int, limit: int) -> Tensor:
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.shape[0] != rows or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{_WHO}: expected `{name}` to be [{rows}] integer ids (one per row), but got shape "
                         f"{tuple(t.shape)} and dtype {t.dtype}.")
    t = t.to(torch.int64)
    if rows and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise ValueError(f"{_WHO}: expected `{name}` in [0, {limit}), but got values in [{int(t.min())}, "
                         f"{int(t.max())}].")
    return t


def select_negatives(
    candidate_scores: Tensor,
    candidate_ids: Tensor,
    positive_ids: Any,
    num_negatives: int = 1,
    *,
    candidate_pool: Optional[int] = None,
    anchor_text_ids: Optional[Any] = None,
    corpus_text_ids: Optional[Any] = None,
    guide_anchor: Optional[Any] = None,
    guide_corpus: Optional[Any] = None,
    margin: float = 0.05,
    margin_strategy: MarginStrategy = "relative",
) -> MinedNegatives:
    """Pick each anchor's negatives from its searched neighbours (best first).

    Row ``i``'s candidates are its searched corpus ids in score order, minus: its own positive
    ``positive_ids[i]``; with text ids, every entry whose text equals the positive's or the
    anchor's, and repeats of a text already among the candidates; then cut to the first
    ``candidate_pool``. With a guide, candidates with ``g(a_i, c) > θ_i`` (the GIST cut-off from
    ``t_i = g(a_i, positive_i)``, ``margin`` and ``margin_strategy``) are dropped as false
    negatives. The first ``num_negatives`` remaining are kept; ``-1`` fills rows with fewer.

    Args:
        candidate_scores, candidate_ids: ``[N, P]`` from :func:`nearest_neighbours` (id ``-1`` = none).
        positive_ids: ``[N]`` corpus id of each anchor's own positive.
        num_negatives: negatives per anchor ``K``.
        candidate_pool: candidates kept per anchor before the guide filter (default: all ``P``).
        anchor_text_ids, corpus_text_ids: ``[N]`` / ``[M]`` ids of the exact texts, from one
            :func:`text_ids` call (both or neither).
        guide_anchor, guide_corpus: ``[N, G]`` / ``[M, G]`` guide embeddings (both or neither).
        margin, margin_strategy: the GIST margin rule (see the module docstring).

    Returns:
        :class:`MinedNegatives` with ``stats``: ``anchors``, ``candidates`` (in the pools),
        ``excluded_positive`` (own positive or its/the anchor's text), ``repeated_text``,
        ``false_negatives_dropped``, ``dropped_share``, ``rows_short`` (fewer than ``K`` kept),
        ``rows_empty`` (none kept).

    Raises:
        ValueError: if the guide drops every candidate (the margin is too strict).
    """
    scores, ids = torch.as_tensor(candidate_scores).float(), torch.as_tensor(candidate_ids).to(torch.int64)
    if scores.dim() != 2 or scores.shape != ids.shape:
        raise ValueError(f"{_WHO}: expected candidate scores and ids of one shape [N, P], but got "
                         f"{tuple(scores.shape)} and {tuple(ids.shape)}.")
    n, p = ids.shape
    k = _check_int("num_negatives", num_negatives, 1)
    pool_size = p if candidate_pool is None else _check_int("candidate_pool", candidate_pool, 1)
    if pool_size < k:
        raise ValueError(f"{_WHO}: expected `candidate_pool` >= `num_negatives` ({k}), but got {pool_size}; a pool "
                         "smaller than the negatives asked for leaves rows short by construction.")
    sizes = [torch.as_tensor(x).shape[0] for x in (corpus_text_ids, guide_corpus) if x is not None]
    pos = _check_ids("positive_ids", positive_ids, n, min(sizes, default=2**62))
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"{_WHO}: expected `margin_strategy` in {MARGIN_STRATEGIES}, but got {margin_strategy!r}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"{_WHO}: expected `margin` to be a finite number, but got {margin!r}.")

    valid = ids >= 0
    safe = ids.clamp_min(0)
    excluded = ~valid | (ids == pos.unsqueeze(1))
    repeated = torch.zeros_like(excluded)
    if (anchor_text_ids is None) != (corpus_text_ids is None):
        raise ValueError(f"{_WHO}: pass both `anchor_text_ids` and `corpus_text_ids` (from one text_ids call) or "
                         "neither.")
    if corpus_text_ids is not None:
        ctext = _check_ids("corpus_text_ids", corpus_text_ids, torch.as_tensor(corpus_text_ids).shape[0], 2**62)
        atext = _check_ids("anchor_text_ids", anchor_text_ids, n, 2**62)
        if ids.numel() and int(ids.max()) >= ctext.shape[0]:
            raise ValueError(f"{_WHO}: candidate ids reach {int(ids.max())}, but `corpus_text_ids` has only "
                             f"{ctext.shape[0]} entries; give one text id per corpus entry.")
        cand_text = ctext[safe]
        excluded |= (cand_text == ctext[pos].unsqueeze(1)) | (cand_text == atext.unsqueeze(1))
        earlier = torch.ones(p, p, dtype=torch.bool).tril(-1)  # [a, b]: b < a
        for a in range(0, n, _CHUNK):  # repeated[n, a]: an earlier kept candidate b has the same text
            t, ex = cand_text[a:a + _CHUNK], excluded[a:a + _CHUNK]
            same = t.unsqueeze(2) == t.unsqueeze(1)
            repeated[a:a + _CHUNK] = (same & earlier & ~ex.unsqueeze(1)).any(2) & ~ex
        excluded |= repeated
    pool = ~excluded & (torch.cumsum((~excluded).long(), 1) <= pool_size)

    dropped = torch.zeros_like(pool)
    if (guide_anchor is None) != (guide_corpus is None):
        raise ValueError(f"{_WHO}: pass both `guide_anchor` and `guide_corpus` or neither.")
    if guide_anchor is not None:
        ga = F.normalize(torch.as_tensor(guide_anchor).float(), dim=-1)
        gc = F.normalize(torch.as_tensor(guide_corpus).float(), dim=-1)
        if ga.dim() != 2 or gc.dim() != 2 or ga.shape[0] != n or ga.shape[1] != gc.shape[1]:
            raise ValueError(f"{_WHO}: expected `guide_anchor` [{n}, G] and `guide_corpus` [M, G], but got "
                             f"{tuple(ga.shape)} and {tuple(gc.shape)}.")
        if ids.numel() and int(ids.max()) >= gc.shape[0]:
            raise ValueError(f"{_WHO}: candidate ids reach {int(ids.max())}, but `guide_corpus` has only "
                             f"{gc.shape[0]} rows; embed every corpus entry with the guide.")
        theta = gist_thresholds((ga * gc[pos]).sum(1), float(margin), margin_strategy)
        for a in range(0, n, _CHUNK):
            g = torch.einsum("ng,npg->np", ga[a:a + _CHUNK], gc[safe[a:a + _CHUNK]])
            dropped[a:a + _CHUNK] = false_negative_mask(g, theta[a:a + _CHUNK])
        dropped &= pool
        if bool(pool.any()) and bool(dropped.sum() == pool.sum()):
            raise ValueError(
                f"{_WHO}: margin={margin} ({margin_strategy}) drops every one of the {int(pool.sum())} candidates as "
                "a false negative (each scores above its guide cut-off), so no negative is left. Use a smaller margin "
                "(relative 0.05 keeps candidates below 95% of the positive's guide score) or check the guide.")
    keep = pool & ~dropped
    rank = torch.cumsum(keep.long(), 1)
    take = keep & (rank <= k)
    out_ids = torch.full((n, k), -1, dtype=torch.int64)
    out_scores = torch.full((n, k), float("nan"))
    rows, cols = take.nonzero(as_tuple=True)
    out_ids[rows, rank[rows, cols] - 1] = ids[rows, cols]
    out_scores[rows, rank[rows, cols] - 1] = scores[rows, cols]
    kept = take.sum(1)
    candidates = int(pool.sum())
    stats = {
        "anchors": float(n), "candidates": float(candidates),
        "excluded_positive": float((excluded & valid & ~repeated).sum()), "repeated_text": float(repeated.sum()),
        "false_negatives_dropped": float(dropped.sum()), "dropped_share": float(dropped.sum()) / max(candidates, 1),
        "rows_short": float((kept < k).sum()), "rows_empty": float((kept == 0).sum()),
    }
    return MinedNegatives(out_ids, out_scores, stats)


def mine_hard_negatives(
    anchor_embeddings: Any,
    corpus_embeddings: Any,
    positive_ids: Any,
    num_negatives: int = 1,
    *,
    candidate_pool: int = 20,
    anchor_text_ids: Optional[Any] = None,
    corpus_text_ids: Optional[Any] = None,
    guide_anchor: Optional[Any] = None,
    guide_corpus: Optional[Any] = None,
    margin: float = 0.05,
    margin_strategy: MarginStrategy = "relative",
    method: SearchMethod = "exact",
    backend: SearchBackend = "auto",
) -> MinedNegatives:
    """Mine ``num_negatives`` hard negatives per anchor among the corpus (see :func:`select_negatives`).

    Searches each anchor's ``candidate_pool + 1`` nearest corpus entries by the miner's cosine (the
    ``+ 1`` leaves room for the anchor's own positive) with :func:`nearest_neighbours`, then selects
    with :func:`select_negatives`. Rows holding repeated texts can have fewer than
    ``candidate_pool`` candidates left after the exclusions. Defaults: relative margin 0.05
    (NV-Retriever's TopK-PercPos 95%); without guide embeddings nothing is dropped by the guide.
    """
    m = torch.as_tensor(corpus_embeddings).shape[0]
    pool = _check_int("candidate_pool", candidate_pool, 1)
    _check_ids("positive_ids", positive_ids, torch.as_tensor(anchor_embeddings).shape[0], m)
    if method not in METHODS:
        raise ValueError(f"{_WHO}: expected `method` in {METHODS}, but got {method!r}.")
    scores, ids = nearest_neighbours(anchor_embeddings, corpus_embeddings, min(m, pool + 1), method, backend=backend)
    return select_negatives(scores, ids, positive_ids, num_negatives, candidate_pool=pool,
                            anchor_text_ids=anchor_text_ids, corpus_text_ids=corpus_text_ids, guide_anchor=guide_anchor,
                            guide_corpus=guide_corpus, margin=margin, margin_strategy=margin_strategy)


# ------------------------------------------------------------------------------------- the negatives file
def texts_fingerprint(anchors: Sequence[str], positives: Sequence[str]) -> str:
    """SHA-256 of the training texts (anchors, then positives, each length-prefixed): ties a file to a dataset.

    Example::

        >>> texts_fingerprint(["a"], ["bc"]) == texts_fingerprint(["ab"], ["c"])
        False
    """
    digest = hashlib.sha256()
    for column in (anchors, positives):
        digest.update(f"column:{len(column)}".encode())
        for text in column:
            raw = text.encode("utf-8")
            digest.update(len(raw).to_bytes(8, "little"))
            digest.update(raw)
    return digest.hexdigest()


def write_mined_negatives(path: Union[str, Path], negative_ids: Any, *, fingerprint: str,
                          options: Optional[dict[str, Any]] = None) -> Path:
    """Write ``negative_ids [N, K]`` (``-1`` = none), ``N``, the texts' fingerprint and the mining options."""
    ids = np.asarray(torch.as_tensor(negative_ids).cpu(), dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"Expected `negative_ids` of shape [N, K] with K >= 1, but got {ids.shape}.")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"Expected a negatives file path ending in .npz, but got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, negative_ids=ids, num_samples=np.int64(ids.shape[0]), fingerprint=np.str_(fingerprint),
             options=np.str_(json.dumps(options or {}, sort_keys=True)), format=np.int64(NEGATIVES_FORMAT))
    return path


def read_mined_negatives(path: Union[str, Path], expected_size: int,
                         expected_fingerprint: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``(negative_ids [N, K], options)`` of a negatives file, checked against the dataset it is used with."""
    path = Path(path)
    remine = "re-mine it for this dataset with `python -m lightning_select.mining` (same data options)"
    if not path.is_file():
        raise FileNotFoundError(f"No negatives file at {str(path)!r}; {remine}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            content = {key: f[key] for key in f.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"The negatives file {str(path)!r} is not a readable .npz ({err}); {remine}.") from None
    missing = [key for key in ("negative_ids", "num_samples", "fingerprint", "options") if key not in content]
    if missing:
        raise ValueError(f"The negatives file {str(path)!r} lacks {missing}; {remine}.")
    ids, size, fingerprint = content["negative_ids"], int(content["num_samples"]), str(content["fingerprint"])
    if size != expected_size or ids.ndim != 2 or ids.shape[0] != size:
        raise ValueError(f"The negatives file {str(path)!r} was mined for {size} training pairs, but this dataset has "
                         f"{expected_size}; {remine}.")
    if fingerprint != expected_fingerprint:
        raise ValueError(f"The negatives file {str(path)!r} was mined from other training texts (fingerprint "
                         f"{fingerprint[:12]}…, this dataset's is {expected_fingerprint[:12]}…): the split, subsample "
                         f"or data file differ; {remine}.")
    if ids.size and (ids.min() < -1 or ids.max() >= size):
        raise ValueError(f"The negatives file {str(path)!r} holds ids outside [-1, {size}); {remine}.")
    return ids.astype(np.int64), json.loads(str(content["options"]))


def fill_missing_negatives(negative_ids: np.ndarray, anchors: Sequence[str], positives: Sequence[str],
                           seed: int, max_draws: int = 1000) -> tuple[np.ndarray, int]:
    """Replace every ``-1`` with a seeded random sample ``j != i`` whose positive text differs from row
    ``i``'s anchor and positive texts; returns ``(filled ids, number filled)``.

    Example::

        >>> ids, filled = fill_missing_negatives(np.array([[1], [-1], [0]]), ["a", "b", "c"], ["x", "y", "z"], 0)
        >>> filled, int(ids[1, 0]) in (0, 2)
        (1, True)
    """
    ids = negative_ids.copy()
    rows, cols = np.nonzero(ids < 0)
    rng = np.random.default_rng(seed)
    for i, c in zip(rows.tolist(), cols.tolist()):
        for _ in range(max_draws):
            j = int(rng.integers(len(positives)))
            if j != i and positives[j] != positives[i] and positives[j] != anchors[i]:
                ids[i, c] = j
                break
        else:
            raise ValueError(f"Could not draw a fallback negative for training pair {i} in {max_draws} tries: every "
                             "other pair shares its text. Mine with a larger `candidate_pool` or a smaller margin.")
    return ids, int(rows.shape[0])


def load_negative_ids(path: Union[str, Path], anchors: Sequence[str], positives: Sequence[str],
                      seed: int) -> np.ndarray:
    """The datamodules' reader: the file checked against ``anchors``/``positives``, ``-1`` filled (seeded)."""
    ids, _ = read_mined_negatives(path, len(anchors), texts_fingerprint(anchors, positives))
    return fill_missing_negatives(ids, anchors, positives, seed)[0]


def gold_false_negative_share(negative_ids: Any, clusters: Any) -> float:
    """Share of mined negatives (ids ``>= 0``) in their anchor's gold cluster (``clusters[j] == clusters[i]``).

    Example::

        >>> gold_false_negative_share(torch.tensor([[1], [0], [-1]]), torch.tensor([5, 5, 7]))
        1.0
    """
    ids, c = torch.as_tensor(negative_ids), torch.as_tensor(clusters)
    found = ids >= 0
    same = c[ids.clamp_min(0)] == c.unsqueeze(1)
    return float((same & found).sum()) / max(int(found.sum()), 1)


# ------------------------------------------------------------------------------------- command line
def embed_texts(encoder: Any, texts: Sequence[str], batch_size: int = 256, desc: str = "embedding") -> Tensor:
    """``[len(texts), D]`` float32 embeddings; each distinct text is encoded once (with a progress bar)."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(texts))
    out = []
    with torch.no_grad():
        for a in tqdm(range(0, len(unique), batch_size), desc=desc, unit="batch"):
            out.append(encoder(unique[a:a + batch_size]).detach().float().cpu())
    where = {t: i for i, t in enumerate(unique)}
    return torch.cat(out)[torch.tensor([where[t] for t in texts], dtype=torch.int64)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_select.mining", description=(
        "Mine hard negatives for the Quora or SICK training pairs (corpus: the training positives), drop the "
        "guide's false negatives, and write a negatives file for the datamodules' `negatives_path=`."))
    p.add_argument("--dataset", choices=("quora", "sick"), required=True)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", required=True, help="the negatives file to write (.npz)")
    p.add_argument("--miner", choices=("guide", "student"), default="guide",
                   help="whose embeddings rank the candidates (the guide filters either way)")
    p.add_argument("--num-negatives", type=int, default=1)
    p.add_argument("--candidate-pool", type=int, default=20)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--margin-strategy", choices=MARGIN_STRATEGIES, default="relative")
    p.add_argument("--no-guide-filter", action="store_true", help="keep the guide's false negatives")
    p.add_argument("--method", choices=METHODS, default="exact")
    p.add_argument("--max-train-pairs", type=int, default=20000, help="Quora training pairs (its datamodule default)")
    p.add_argument("--seed", type=int, default=0, help="the datamodule's split seed")
    p.add_argument("--batch-size", type=int, default=256, help="texts per encoder call")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command line entry point; returns the printed stats."""
    args = _parser().parse_args(argv)
    from lightning_select.data.text import QuoraDuplicatesDataModule, SickDataModule
    from lightning_select.guides import load_guide
    from lightning_select.models.text import StaticEmbeddingEncoder

    if args.dataset == "quora":
        dm: Any = QuoraDuplicatesDataModule(data_dir=args.data_dir, max_train_pairs=args.max_train_pairs,
                                            seed=args.seed)
    else:
        dm = SickDataModule(data_dir=args.data_dir, seed=args.seed)
    dm.setup("fit")
    table = dm.train_set.dataset
    anchors, positives = list(table.anchors), list(table.positives)
    n = len(anchors)
    g_anchor = g_corpus = None
    if args.miner == "guide" or not args.no_guide_filter:
        guide = load_guide("minilm").eval()
        g_anchor, g_corpus = embed_texts(guide, anchors + positives, args.batch_size, "guide").split(n)
    if args.miner == "guide":
        m_anchor, m_corpus = g_anchor, g_corpus
    else:
        student = StaticEmbeddingEncoder.from_pretrained(Path(args.data_dir) / "models" / "minilm-l6-m2v-128d").eval()
        m_anchor, m_corpus = embed_texts(student, anchors + positives, args.batch_size, "student").split(n)
    a_text, c_text = text_ids(anchors, positives)
    scores, ids = nearest_neighbours(m_anchor, m_corpus, min(n, args.candidate_pool + 1), args.method)
    common = dict(candidate_pool=args.candidate_pool, anchor_text_ids=a_text, corpus_text_ids=c_text)
    unfiltered = select_negatives(scores, ids, torch.arange(n), args.num_negatives, **common)
    mined = unfiltered if args.no_guide_filter else select_negatives(
        scores, ids, torch.arange(n), args.num_negatives, guide_anchor=g_anchor, guide_corpus=g_corpus,
        margin=args.margin, margin_strategy=args.margin_strategy, **common)
    options = {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "batch_size")}
    path = write_mined_negatives(args.out, mined.ids, fingerprint=texts_fingerprint(anchors, positives),
                                 options=options)
    stats: dict[str, Any] = dict(mined.stats)
    if args.dataset == "quora":
        stats["gold_false_negative_share_unfiltered"] = gold_false_negative_share(unfiltered.ids, dm.train_clusters)
        stats["gold_false_negative_share"] = gold_false_negative_share(mined.ids, dm.train_clusters)
    print(f"wrote {path} ({n} training pairs x {args.num_negatives} negatives)")
    for key, value in stats.items():
        shown = int(value) if float(value).is_integer() and key != "dropped_share" else f"{value:.4g}"
        print(f"  {key}: {shown}")
    return stats


if __name__ == "__main__":
    main()
