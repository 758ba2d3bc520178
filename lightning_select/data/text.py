"""Text-pair data for contrastive sentence embeddings: Quora duplicates, SICK and the STS benchmark.

Training items are dicts ``{"anchor": str, "positive": str, "anchor_cluster": int,
"positive_cluster": int, "index": int}``; the default collate turns them into lists of strings and
``LongTensor`` s. The two ``*_cluster`` keys identify what an in-batch negative would have to share
with an anchor to be a false negative (a Quora duplicate cluster, or an exact SICK sentence), and
they are the keys that :class:`NoDuplicatesBatchSampler` keeps apart.

Held-out data is a *retrieval view*: every held-out text is both a document and a query, and
``relevance()`` says which other texts are relevant to it (see
:func:`lightning_select.evaluation.retrieval_report`).

The files are read from a data folder (``data_dir``, default ``../shared/data``; the environment
variable ``LIGHTNING_SELECT_DATA`` overrides that default). Nothing is downloaded unless a
Hugging Face dataset name is given explicitly.

Example::

    >>> quora_clusters([1, 2, 3, 5], [2, 3, 4, 6], [1, 1, 0, 1])
    {1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 2}
    >>> sampler = NoDuplicatesBatchSampler([(0, 0), (0, 0), (1, 1), (2, 2)], batch_size=2, seed=0)
    >>> any({0, 1} <= set(b) for b in sampler), sorted(i for b in sampler for i in b)
    (False, [0, 1, 2, 3])
"""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_select.batch import IndexedDataset
from lightning_select.data.digits import EpochSeededSampler

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DEFAULT_DATA_DIR = "../shared/data"
DATA_ENV_VAR = "LIGHTNING_SELECT_DATA"
QUORA_FILE = "text_pairs/quora/quora_duplicate_questions.tsv.gz"
SICK_DIR = "text_pairs/sick2014"
STSB_DIR = "text_pairs/stsbenchmark"
_SICK_FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
_VAL_BATCH_SIZE = 512


# ---------------------------------------------------------------------------------------------- paths
def resolve_data_dir(data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR) -> Path:
    """The data folder to read from.

    ``None`` or the default ``"../shared/data"`` is replaced by ``$LIGHTNING_SELECT_DATA`` when that
    variable is set; any other value is used as given.

    Example::

        >>> str(resolve_data_dir("/tmp/my-data"))
        '/tmp/my-data'
    """
    if data_dir is None or str(data_dir) == DEFAULT_DATA_DIR:
        data_dir = os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _require_file(data_dir: Union[str, os.PathLike, None], relative: str) -> Path:
    root = resolve_data_dir(data_dir)
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the data file {str(path)!r} (data folder {str(root)!r} + {relative!r}), but it does not "
            f"exist. Pass `data_dir=` pointing at the shared data folder, or set the environment variable "
            f"{DATA_ENV_VAR}."
        )
    return path


# ------------------------------------------------------------------------------------- clusters
def _cluster_arrays(qid1: Any, qid2: Any, is_duplicate: Any) -> tuple[np.ndarray, np.ndarray]:
    """Unique question ids (sorted) and the cluster id of each, clusters numbered by smallest qid."""
    q1 = np.asarray(qid1, dtype=np.int64).ravel()
    q2 = np.asarray(qid2, dtype=np.int64).ravel()
    dup = np.asarray(is_duplicate).ravel().astype(bool)
    if not (q1.shape == q2.shape == dup.shape):
        raise ValueError(
            f"Expected `qid1`, `qid2` and `is_duplicate` of equal length, but got {q1.shape[0]}, {q2.shape[0]} "
            f"and {dup.shape[0]}."
        )
    uniq, inverse = np.unique(np.concatenate([q1, q2]), return_inverse=True)
    n = q1.shape[0]
    left, right = inverse[:n][dup].tolist(), inverse[n:][dup].tolist()
    parent = list(range(uniq.shape[0]))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in zip(left, right):
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller root wins, so every root is its component's smallest member
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    roots = np.fromiter((find(i) for i in range(len(parent))), dtype=np.int64, count=len(parent))
    _, cluster = np.unique(roots, return_inverse=True)
    return uniq, cluster.astype(np.int64)


def quora_clusters(qid1: Any, qid2: Any, is_duplicate: Any) -> dict[int, int]:
    """Transitive closure of duplicate pairs: a cluster id for every question id.

    Union-find with path halving over the pairs marked duplicate. Every question id that occurs in
    ``qid1`` or ``qid2`` gets an id; a question without duplicates is a cluster of its own.
    Clusters are numbered ``0..C-1`` in the order of their smallest question id. All 404k Quora
    rows take about a second.

    Args:
        qid1: question ids of the first question of each pair (any 1-D integer array-like).
        qid2: question ids of the second question of each pair.
        is_duplicate: truthy where the pair is a duplicate.

    Returns:
        ``{question id: cluster id}``.

    Example::

        >>> quora_clusters([10, 11, 12], [11, 13, 14], [1, 1, 0])
        {10: 0, 11: 0, 12: 1, 13: 0, 14: 2}
    """
    uniq, cluster = _cluster_arrays(qid1, qid2, is_duplicate)
    return dict(zip(uniq.tolist(), cluster.tolist()))


# ------------------------------------------------------------------------------------- sampler
class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Batches in which no two samples share a key (e.g. a Quora cluster or an exact sentence).

    Each epoch starts from a permutation seeded by ``(seed, epoch)``. Batches are then filled
    greedily in that order; a sample that shares a key with a sample already in the batch is
    deferred and tried again, first, for the next batch. A batch is closed once it holds
    ``batch_size`` samples or when no remaining sample fits, so towards the end of an epoch (when
    the remaining samples collide) batches can be smaller. A sample's own keys may repeat (e.g.
    anchor and positive in the same cluster).

    With ``drop_last=False`` every sample appears exactly once per epoch. With ``drop_last=True``
    every batch smaller than ``batch_size`` is dropped, so the samples of such batches are skipped
    for that epoch.

    The batches of an epoch are computed on first use (``len()`` or iteration) and cached, so
    ``len()`` is exactly the number of batches that the next iteration yields. Lightning calls
    :meth:`set_epoch` at the start of every epoch.

    Under DDP every rank builds the same global list of batches (same seed and epoch) and takes every
    ``num_replicas``-th one, starting at ``rank``; the list is padded with its first batches so that
    every rank gets the same number. Lightning cannot inject a DistributedSampler into a custom batch
    sampler, so run such trainers with ``Trainer(use_distributed_sampler=False)``.

    Args:
        keys: per sample, the keys it must not share with any other sample of its batch.
        batch_size: maximum batch size.
        seed: seed of the per-epoch permutation.
        drop_last: drop batches smaller than ``batch_size``.
        num_replicas: number of DDP ranks sharing the epoch.
        rank: this process's rank.

    Example::

        >>> s = NoDuplicatesBatchSampler([("a", "b"), ("b", "c"), ("d", "e"), ("f", "g")], batch_size=2)
        >>> batches = list(s)
        >>> len(batches) == len(s), sorted(i for b in batches for i in b)
        (True, [0, 1, 2, 3])
    """

    def __init__(
        self,
        keys: Sequence[Sequence[Hashable]],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"Expected 0 <= rank < num_replicas, but got rank={rank}, num_replicas={num_replicas}.")
        self.num_replicas, self.rank = num_replicas, rank
        self.keys = [frozenset(k) for k in keys]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: Optional[tuple[int, list[list[int]]]] = None

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning at the start of every epoch)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        remaining = dict.fromkeys(torch.randperm(len(self.keys), generator=g).tolist())  # ordered set
        batches: list[list[int]] = []
        while remaining:
            batch: list[int] = []
            taken: set[Hashable] = set()
            for i in remaining:
                k = self.keys[i]
                if taken.isdisjoint(k):
                    batch.append(i)
                    taken.update(k)
                    if len(batch) == self.batch_size:
                        break
            for i in batch:
                del remaining[i]
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
        if self.num_replicas > 1 and batches:
            padded = batches + batches[: (-len(batches)) % self.num_replicas]
            batches = padded[self.rank :: self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self._batches()])

    def __len__(self) -> int:
        return len(self._batches())


# ------------------------------------------------------------------------------------- datasets
class _PairTable(Dataset):
    """Anchor/positive strings with one integer key each."""

    def __init__(self, anchors: list[str], positives: list[str], keys: Tensor) -> None:
        self.anchors, self.positives, self.keys = anchors, positives, keys

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "anchor": self.anchors[i],
            "positive": self.positives[i],
            "anchor_cluster": int(self.keys[i, 0]),
            "positive_cluster": int(self.keys[i, 1]),
        }


class _TextTable(Dataset):
    """Held-out texts, optionally with an integer label each."""

    def __init__(self, texts: list[str], labels: Optional[Tensor] = None) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"text": self.texts[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


class _TextPairsDataModule(pl.LightningDataModule):
    """Shared plumbing: train loader (seeded / no-duplicates / DDP), held-out loader, relevance."""

    def __init__(self, batch_size: int, seed: int, index_key: str, no_duplicates: bool) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        self.batch_size = batch_size
        self.seed = seed
        self.index_key = index_key
        self.no_duplicates = no_duplicates
        self.train_set: Optional[IndexedDataset] = None
        self.test_set: Optional[IndexedDataset] = None
        self.train_keys: Optional[Tensor] = None  # [M, 2] anchor/positive keys
        self.test_texts: list[str] = []
        self._relevance: Optional[Tensor] = None

    def _require_setup(self) -> None:
        if self.train_set is None or self.test_set is None:
            raise RuntimeError(f"Call `{type(self).__name__}.setup()` before asking for data loaders or relevance.")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        assert self.train_set is not None and self.train_keys is not None
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if self.no_duplicates:
            world, rank = 1, 0
            if distributed:
                assert self.trainer is not None
                if getattr(self.trainer._accelerator_connector, "use_distributed_sampler", True):
                    raise ValueError(
                        "`no_duplicates=True` under DDP shards batches itself, and Lightning cannot inject a "
                        "DistributedSampler into a custom batch sampler: create the Trainer with "
                        "`use_distributed_sampler=False`."
                    )
                world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = NoDuplicatesBatchSampler(self.train_keys.tolist(), self.batch_size, seed=self.seed,
                                               num_replicas=world, rank=rank)
            return DataLoader(self.train_set, batch_sampler=sampler)
        # Under DDP, Lightning swaps in a DistributedSampler (seeded, set_epoch'ed) for shuffle=True.
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=distributed,
            sampler=None if distributed else EpochSeededSampler(len(self.train_set), self.seed),
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out texts in order: dicts ``{"text": list[str], "index": LongTensor}`` (+ ``"label"``)."""
        self._require_setup()
        return DataLoader(self.test_set, batch_size=_VAL_BATCH_SIZE, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _build_relevance(self) -> Tensor:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def relevance(self) -> Tensor:
        """``[N, N]`` bool: ``[i, j]`` is True when held-out text ``j`` is relevant to query ``i``.

        Symmetric, with a False diagonal; ``N = len(self.test_texts)``. Cached.
        """
        self._require_setup()
        if self._relevance is None:
            rel = self._build_relevance()
            rel.fill_diagonal_(False)
            self._relevance = rel
        return self._relevance


# ------------------------------------------------------------------------------------- Quora
def _read_quora_tsv(path: Path) -> "pd.DataFrame":
    import pandas as pd

    df = pd.read_csv(path, sep="\t", compression="gzip", keep_default_na=False)
    expected = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"Expected the columns {expected} in {str(path)!r}, but {missing} are missing.")
    return df


def _quora_from_hf(name: str) -> "pd.DataFrame":
    """Rows ``qid1, qid2, question1, question2, is_duplicate`` from a Hugging Face dataset.

    Understands the legacy ``quora`` layout (``questions: {id, text}``, ``is_duplicate``), tables
    with the TSV's own columns, and ``question1/question2/label`` tables (GLUE QQP); where there are
    no question ids, identical texts share one id. All splits are concatenated (the split is ours).
    """
    import datasets  # lazy: optional, and it needs the network
    import pandas as pd

    loaded = datasets.load_dataset(name)
    splits = list(loaded.values()) if isinstance(loaded, dict) else [loaded]
    frames = []
    for split in splits:
        cols = set(split.column_names)
        if "questions" in cols and "is_duplicate" in cols:
            q = split["questions"]
            frames.append(
                pd.DataFrame(
                    {
                        "qid1": [int(x["id"][0]) for x in q],
                        "qid2": [int(x["id"][1]) for x in q],
                        "question1": [x["text"][0] for x in q],
                        "question2": [x["text"][1] for x in q],
                        "is_duplicate": [int(bool(d)) for d in split["is_duplicate"]],
                    }
                )
            )
        elif {"question1", "question2"} <= cols and ({"is_duplicate", "label"} & cols):
            frame = split.to_pandas()
            if "is_duplicate" not in frame.columns:
                frame["is_duplicate"] = frame["label"]
            frames.append(frame)
        else:
            raise ValueError(
                f"Expected a Quora-style dataset with `questions`+`is_duplicate` or `question1`/`question2`+"
                f"`is_duplicate`/`label` columns, but {name!r} has {sorted(cols)}."
            )
    df = pd.concat(frames, ignore_index=True)
    df["question1"] = df["question1"].fillna("").astype(str)
    df["question2"] = df["question2"].fillna("").astype(str)
    df["is_duplicate"] = (df["is_duplicate"].astype(int) == 1).astype(int)
    if "qid1" not in df.columns or "qid2" not in df.columns:
        codes, _ = pd.factorize(pd.concat([df["question1"], df["question2"]], ignore_index=True))
        df["qid1"], df["qid2"] = codes[: len(df)], codes[len(df) :]
    return df


class QuoraDuplicatesDataModule(_TextPairsDataModule):
    """Quora duplicate questions, split by duplicate cluster, with a held-out retrieval set.

    Clusters are the transitive closure of the duplicate pairs (:func:`quora_clusters`). A seeded
    RNG picks ``test_clusters`` clusters of at least ``min_cluster_size`` questions for the
    held-out set; every question of those clusters (deduplicated by question id) is a held-out
    text, labelled by its cluster, and relevant to the other questions of its cluster.

    Training samples are the duplicate pairs of all other clusters, minus any pair with a question
    whose exact text is also a held-out text; ``max_train_pairs`` of them are kept (seeded). The
    test split does not depend on ``max_train_pairs``.

    Attributes set by :meth:`setup`:
        train_set: training items ``{"anchor", "positive", "anchor_cluster", "positive_cluster"}``
            plus the sample index under ``index_key``.
        train_clusters: ``[M]`` cluster id of every training sample (anchor and positive share it),
            the gold labels for false-negative evaluation.
        train_keys: ``[M, 2]`` the keys used by ``no_duplicates`` (both columns are the cluster).
        test_texts: held-out questions; test_labels: ``[N]`` their cluster ids.
        clusters: ``{question id: cluster id}`` for every question in the file.

    Args:
        data_dir: data folder holding ``text_pairs/quora/quora_duplicate_questions.tsv.gz``.
        batch_size: training batch size (per process).
        max_train_pairs: number of training pairs to keep (``None``: all).
        test_clusters: number of held-out clusters.
        min_cluster_size: minimum size of a held-out cluster.
        seed: seed of the split, the subsample and the data order.
        index_key: key of the sample index in each batch.
        no_duplicates: batch with :class:`NoDuplicatesBatchSampler` so that no batch holds two
            samples of one cluster (single process only).
        hf_dataset: load the pairs with ``datasets.load_dataset(hf_dataset)`` instead of the file
            (needs the ``datasets`` package and usually the network).
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        batch_size: int = 64,
        max_train_pairs: Optional[int] = 20000,
        test_clusters: int = 1000,
        min_cluster_size: int = 3,
        seed: int = 0,
        index_key: str = "index",
        no_duplicates: bool = False,
        hf_dataset: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size, seed, index_key, no_duplicates)
        if max_train_pairs is not None and max_train_pairs < 1:
            raise ValueError(f"Expected `max_train_pairs` to be None or >= 1, but got {max_train_pairs}.")
        if test_clusters < 1:
            raise ValueError(f"Expected `test_clusters` >= 1, but got {test_clusters}.")
        if min_cluster_size < 2:
            raise ValueError(
                f"Expected `min_cluster_size` >= 2 (a held-out question needs a relevant partner), but got "
                f"{min_cluster_size}."
            )
        self.data_dir = data_dir
        self.max_train_pairs = max_train_pairs
        self.test_clusters = test_clusters
        self.min_cluster_size = min_cluster_size
        self.hf_dataset = hf_dataset
        self.train_clusters: Optional[Tensor] = None
        self.test_labels: Optional[Tensor] = None
        self.clusters: dict[int, int] = {}

    def _load_frame(self) -> "pd.DataFrame":
        if self.hf_dataset is not None:
            return _quora_from_hf(self.hf_dataset)
        return _read_quora_tsv(_require_file(self.data_dir, QUORA_FILE))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        import pandas as pd

        df = self._load_frame()
        q1 = df["qid1"].to_numpy(dtype=np.int64)
        q2 = df["qid2"].to_numpy(dtype=np.int64)
        dup = df["is_duplicate"].to_numpy() == 1
        uniq, cluster_of_uniq = _cluster_arrays(q1, q2, dup)
        self.clusters = dict(zip(uniq.tolist(), cluster_of_uniq.tolist()))
        c1 = cluster_of_uniq[np.searchsorted(uniq, q1)]

        # held-out clusters
        rng = np.random.default_rng(self.seed)
        sizes = np.bincount(cluster_of_uniq)
        eligible = np.flatnonzero(sizes >= self.min_cluster_size)
        if eligible.shape[0] < self.test_clusters:
            raise ValueError(
                f"Expected at most {eligible.shape[0]} `test_clusters` (clusters with >= {self.min_cluster_size} "
                f"questions), but got {self.test_clusters}. Lower `test_clusters` or `min_cluster_size`."
            )
        chosen = np.sort(rng.choice(eligible, size=self.test_clusters, replace=False))
        is_test_cluster = np.zeros(sizes.shape[0], dtype=bool)
        is_test_cluster[chosen] = True

        # held-out texts: one per question id of the chosen clusters, ordered by question id
        texts = pd.DataFrame(
            {
                "qid": np.concatenate([q1, q2]),
                "text": pd.concat([df["question1"], df["question2"]], ignore_index=True).astype(str).to_numpy(),
            }
        ).drop_duplicates("qid")
        texts = texts.sort_values("qid", kind="stable")
        text_cluster = cluster_of_uniq[np.searchsorted(uniq, texts["qid"].to_numpy())]
        held = is_test_cluster[text_cluster]
        self.test_texts = texts["text"].to_numpy()[held].tolist()
        self.test_labels = torch.as_tensor(text_cluster[held], dtype=torch.long)

        # training pairs: duplicates of the other clusters, with no held-out text in them
        held_texts = set(self.test_texts)
        a_text = df["question1"].astype(str).to_numpy()
        p_text = df["question2"].astype(str).to_numpy()
        leaks = np.fromiter(
            ((a in held_texts) or (p in held_texts) for a, p in zip(a_text, p_text)), dtype=bool, count=len(df)
        )
        rows = np.flatnonzero(dup & ~is_test_cluster[c1] & ~leaks)
        if self.max_train_pairs is not None and rows.shape[0] > self.max_train_pairs:
            rows = np.sort(rng.choice(rows, size=self.max_train_pairs, replace=False))
        train_clusters = torch.as_tensor(c1[rows], dtype=torch.long)
        self.train_clusters = train_clusters
        self.train_keys = torch.stack([train_clusters, train_clusters], dim=1)
        self.train_set = IndexedDataset(
            _PairTable(a_text[rows].tolist(), p_text[rows].tolist(), self.train_keys), self.index_key
        )
        self.test_set = IndexedDataset(_TextTable(self.test_texts, self.test_labels), self.index_key)

    def _build_relevance(self) -> Tensor:
        assert self.test_labels is not None
        return self.test_labels.view(-1, 1) == self.test_labels.view(1, -1)


# ------------------------------------------------------------------------------------- SICK / STSb
def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_sick(
    data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR, split: str = "test"
) -> tuple[list[str], list[str], Tensor]:
    """SICK 2014 sentence pairs and relatedness scores (1–5).

    Args:
        data_dir: data folder holding ``text_pairs/sick2014``.
        split: ``"train"``, ``"trial"`` or ``"test"``.

    Returns:
        ``(sentence_A, sentence_B, relatedness)`` with ``relatedness`` a ``[N]`` float tensor.
    """
    if split not in _SICK_FILES:
        raise ValueError(f"Expected `split` in {sorted(_SICK_FILES)}, but got {split!r}.")
    path = _require_file(data_dir, f"{SICK_DIR}/{_SICK_FILES[split]}")
    rows = _read_tsv(path)
    header, body = rows[0], rows[1:]
    try:
        ia, ib, ir = header.index("sentence_A"), header.index("sentence_B"), header.index("relatedness_score")
    except ValueError as err:
        raise ValueError(
            f"Expected a header with sentence_A, sentence_B and relatedness_score in {str(path)!r}, but got {header}."
        ) from err
    body = [r for r in body if r]
    return [r[ia] for r in body], [r[ib] for r in body], torch.tensor([float(r[ir]) for r in body])


def load_stsb(
    data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR, split: str = "test"
) -> tuple[list[str], list[str], Tensor]:
    """STS benchmark sentence pairs and gold similarity scores (0–5).

    ``sts-{split}.csv`` are TAB-separated without a header: ``genre, file, year, id, score,
    sentence1, sentence2``; some rows carry two extra trailing columns (source notes), which are
    ignored. Quotes are literal (``csv.QUOTE_NONE``).

    Args:
        data_dir: data folder holding ``text_pairs/stsbenchmark``.
        split: ``"train"``, ``"dev"`` or ``"test"``.

    Returns:
        ``(sentence1, sentence2, scores)`` with ``scores`` a ``[N]`` float tensor.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"Expected `split` in ['dev', 'test', 'train'], but got {split!r}.")
    path = _require_file(data_dir, f"{STSB_DIR}/sts-{split}.csv")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for line, row in enumerate(_read_tsv(path), start=1):
        if not row:
            continue
        if len(row) < 7:
            raise ValueError(
                f"Expected at least 7 tab-separated columns in {str(path)!r} line {line}, but got {len(row)}."
            )
        scores.append(float(row[4]))
        s1.append(row[5])
        s2.append(row[6])
    return s1, s2, torch.tensor(scores)


class SickDataModule(_TextPairsDataModule):
    """SICK 2014: related sentence pairs for training, and a retrieval view of the test split.

    Training samples are the ``SICK_train.txt`` pairs with ``relatedness_score >= min_relatedness``
    (anchor = ``sentence_A``, positive = ``sentence_B``). Their ``anchor_cluster`` /
    ``positive_cluster`` values are ids of the exact sentence text (one id per distinct training
    sentence), so ``no_duplicates=True`` keeps a sentence out of two samples of one batch.

    Held-out: every distinct sentence of ``SICK_test_annotated.txt`` (first-appearance order,
    ``sentence_A`` before ``sentence_B`` of each row) is a document and a query; a pair with
    ``relatedness_score >= min_relatedness`` is relevant in both directions.

    Attributes set by :meth:`setup`:
        train_set: training items (see the module docstring) plus the index under ``index_key``.
        train_keys: ``[M, 2]`` anchor/positive sentence ids.
        train_sentences: the distinct training sentences (position = sentence id).
        test_texts: the distinct test sentences.
        test_pairs: ``[P, 2]`` positions in ``test_texts`` of the relevant pairs (one row per pair).

    Args:
        data_dir: data folder holding ``text_pairs/sick2014``.
        batch_size: training batch size (per process).
        min_relatedness: relatedness threshold (1–5) of a positive / relevant pair.
        seed: seed of the data order.
        index_key: key of the sample index in each batch.
        no_duplicates: batch with :class:`NoDuplicatesBatchSampler` (single process only).
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        batch_size: int = 64,
        min_relatedness: float = 4.0,
        seed: int = 0,
        index_key: str = "index",
        no_duplicates: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, index_key, no_duplicates)
        if not 1.0 <= min_relatedness <= 5.0:
            raise ValueError(f"Expected `min_relatedness` in [1, 5] (the SICK scale), but got {min_relatedness}.")
        self.data_dir = data_dir
        self.min_relatedness = min_relatedness
        self.train_sentences: list[str] = []
        self.test_pairs: Optional[Tensor] = None

    @staticmethod
    def _ids(a: list[str], b: list[str]) -> tuple[list[str], Tensor]:
        """Distinct sentences in first-appearance order (a_0, b_0, a_1, ...) and ``[M, 2]`` ids."""
        vocab: dict[str, int] = {}
        ids = [[vocab.setdefault(x, len(vocab)), vocab.setdefault(y, len(vocab))] for x, y in zip(a, b)]
        return list(vocab), torch.tensor(ids, dtype=torch.long).view(-1, 2)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        a, b, score = load_sick(self.data_dir, "train")
        keep = (score >= self.min_relatedness).tolist()
        a = [x for x, k in zip(a, keep) if k]
        b = [x for x, k in zip(b, keep) if k]
        if not a:
            raise ValueError(
                f"Expected some SICK training pairs with relatedness >= {self.min_relatedness}, but got none. "
                "Lower `min_relatedness`."
            )
        self.train_sentences, self.train_keys = self._ids(a, b)
        self.train_set = IndexedDataset(_PairTable(a, b, self.train_keys), self.index_key)

        ta, tb, tscore = load_sick(self.data_dir, "test")
        self.test_texts, test_ids = self._ids(ta, tb)
        relevant = (tscore >= self.min_relatedness) & (test_ids[:, 0] != test_ids[:, 1])
        self.test_pairs = test_ids[relevant]
        self.test_set = IndexedDataset(_TextTable(self.test_texts), self.index_key)

    def _build_relevance(self) -> Tensor:
        assert self.test_pairs is not None
        n = len(self.test_texts)
        rel = torch.zeros(n, n, dtype=torch.bool)
        rel[self.test_pairs[:, 0], self.test_pairs[:, 1]] = True
        rel[self.test_pairs[:, 1], self.test_pairs[:, 0]] = True
        return rel
