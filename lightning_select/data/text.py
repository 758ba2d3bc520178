"""Text-pair data for contrastive sentence embeddings: Quora duplicates, SICK and the STS benchmark.

Training items are dicts ``{"anchor": str, "positive": str, "anchor_cluster": int,
"positive_cluster": int, "index": int}``; the default collate turns them into lists of strings and
``LongTensor`` s. The two ``*_cluster`` keys identify what an in-batch negative would have to share
with an anchor to be a false negative (a Quora duplicate cluster, or an exact SICK sentence), and
they are the keys that :class:`NoDuplicatesBatchSampler` keeps apart.

Held-out data is a *retrieval view*: every held-out text is both a document and a query, and
``relevance()`` says which other texts are relevant to it (see
:func:`lightning_select.evaluation.retrieval_report`).

Files and their readers are in :mod:`lightning_select.data.files`; the duplicate-free sampler and
the clustering helpers in :mod:`lightning_select.samplers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_select.core.batch import IndexedDataset
from lightning_select.data.files import DEFAULT_DATA_DIR, QUORA_FILE, load_sick, quora_from_hf, read_quora_tsv, require_file
from lightning_select.samplers.clustering import cluster_arrays
from lightning_select.samplers.epoch import shuffled_loader_kwargs
from lightning_select.samplers.factory import BatchSamplerFactory, batch_sampler_loader
from lightning_select.samplers.resumable import ResumableDataLoader
from lightning_select.samplers.no_duplicates import NoDuplicatesBatchSampler

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_VAL_BATCH_SIZE = 512


# ------------------------------------------------------------------------------------- datasets
class _PairTable(Dataset):
    """Anchor/positive strings with one integer key each, and optionally mined negatives.

    ``negatives[i, k]`` is the training pair whose positive text is item ``i``'s ``negative_k``; its
    positive's key is ``negative_k_cluster`` (the gold key a false-negative audit compares).
    """

    def __init__(self, anchors: list[str], positives: list[str], keys: Tensor,
                 negatives: Optional[np.ndarray] = None) -> None:
        self.anchors, self.positives, self.keys, self.negatives = anchors, positives, keys, negatives

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "anchor": self.anchors[i],
            "positive": self.positives[i],
            "anchor_cluster": int(self.keys[i, 0]),
            "positive_cluster": int(self.keys[i, 1]),
            **({} if self.negatives is None else
               {f"negative_{k}": self.positives[j] for k, j in enumerate(self.negatives[i].tolist())}),
            **({} if self.negatives is None else
               {f"negative_{k}_cluster": int(self.keys[j, 1]) for k, j in enumerate(self.negatives[i].tolist())}),
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

    def __init__(self, batch_size: int, seed: int, index_key: str, no_duplicates: bool,
                 batch_sampler: Optional[BatchSamplerFactory] = None, negatives_path: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        if no_duplicates and batch_sampler is not None:
            raise ValueError("Expected at most one of `no_duplicates=True` and `batch_sampler`, but got both: the "
                             "duplicate-free sampler is a batch sampler itself. Drop one of them.")
        self.batch_size = batch_size
        self.seed = seed
        self.index_key = index_key
        self.no_duplicates = no_duplicates
        self.batch_sampler = batch_sampler
        self.negatives_path = negatives_path
        self.train_set: Optional[IndexedDataset] = None
        self.test_set: Optional[IndexedDataset] = None
        self.train_keys: Optional[Tensor] = None  # [M, 2] anchor/positive keys
        self.test_texts: list[str] = []
        self._relevance: Optional[Tensor] = None

    def _pair_table(self, anchors: list[str], positives: list[str], keys: Tensor) -> _PairTable:
        """The training pairs, with ``negative_0..K-1`` columns from ``negatives_path`` if set."""
        negatives = None
        if self.negatives_path is not None:
            from lightning_select.mining import load_negative_ids

            negatives = load_negative_ids(self.negatives_path, anchors, positives, self.seed)
        return _PairTable(anchors, positives, keys, negatives)

    def _require_setup(self) -> None:
        if self.train_set is None or self.test_set is None:
            raise RuntimeError(f"Call `{type(self).__name__}.setup()` before asking for data loaders or relevance.")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        assert self.train_set is not None and self.train_keys is not None
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if self.batch_sampler is not None:
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            return batch_sampler_loader(self.train_set, self.batch_sampler, self.batch_size, self.seed, world, rank)
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
            return ResumableDataLoader(self.train_set, batch_sampler=sampler)
        world = self.trainer.world_size if self.trainer is not None else 1
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, drop_last=False,
                          **shuffled_loader_kwargs(len(self.train_set), self.seed, world))

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
        batch_sampler: a factory of a composing batch sampler (clustered, cluster-reweighted,
            neighbour-exclusion), called as in :mod:`lightning_select.samplers.factory`; excludes
            ``no_duplicates``.
        negatives_path: a negatives file from :mod:`lightning_select.mining` (``.npz``) mined for this
            training set (same split and subsample; checked by size and a fingerprint of the texts).
            Each training item then carries ``negative_0..negative_{K-1}``: the positive text of the
            mined pair. A pair the miner left short (``-1``) gets a random other pair's positive,
            drawn once with ``seed`` (never its own positive or anchor text).
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
        batch_sampler: Optional[BatchSamplerFactory] = None,
        negatives_path: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size, seed, index_key, no_duplicates, batch_sampler, negatives_path)
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
            return quora_from_hf(self.hf_dataset)
        return read_quora_tsv(require_file(self.data_dir, QUORA_FILE))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        import pandas as pd

        df = self._load_frame()
        q1 = df["qid1"].to_numpy(dtype=np.int64)
        q2 = df["qid2"].to_numpy(dtype=np.int64)
        dup = df["is_duplicate"].to_numpy() == 1
        uniq, cluster_of_uniq = cluster_arrays(q1, q2, dup)
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
            self._pair_table(a_text[rows].tolist(), p_text[rows].tolist(), self.train_keys), self.index_key
        )
        self.test_set = IndexedDataset(_TextTable(self.test_texts, self.test_labels), self.index_key)

    def _build_relevance(self) -> Tensor:
        assert self.test_labels is not None
        return self.test_labels.view(-1, 1) == self.test_labels.view(1, -1)


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
        batch_sampler: a factory of a composing batch sampler, as for :class:`QuoraDuplicatesDataModule`.
        negatives_path: mined hard negatives, as for :class:`QuoraDuplicatesDataModule`.
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        batch_size: int = 64,
        min_relatedness: float = 4.0,
        seed: int = 0,
        index_key: str = "index",
        no_duplicates: bool = False,
        batch_sampler: Optional[BatchSamplerFactory] = None,
        negatives_path: Optional[str] = None,
    ) -> None:
        super().__init__(batch_size, seed, index_key, no_duplicates, batch_sampler, negatives_path)
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
        self.train_set = IndexedDataset(self._pair_table(a, b, self.train_keys), self.index_key)

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
