"""``GuidedNegatives``: the GISTEmbed callback.

The rule is :func:`~lightning_select.rules.gist.apply_gist`; guide lookups and the embedding cache
are :class:`~lightning_select.guides.lookup.GuideLookup`; flagged pairs go to a checkpointed
:class:`~lightning_select.stats.flagged_pairs.FlaggedPairLog`. This callback owns the options, the
logit edit, the cross-device candidates and the logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.distributed import all_gather_rows, valid_rows
from lightning_select.core.engine import override
from lightning_select.core.options import (
    bool_option,
    int_option,
    path_option,
    real_option,
    str_list_option,
    str_option,
)
from lightning_select.core.preemption import TrainingPreempted
from lightning_select.guides.cache import GuideEmbeddingCache
from lightning_select.guides.lookup import GuideLookup
from lightning_select.rules.contrastive import ContrastiveLogits, LogitBlock
from lightning_select.rules.gist import (
    FALSE_NEGATIVE_MODES,
    MARGIN_STRATEGIES,
    FalseNegativeMode,
    MarginStrategy,
    apply_gist,
)

#: ``guide=SELF_GUIDE``: the student's own detached similarities are the guide (no guide model).
SELF_GUIDE = "self"
from lightning_select.stats.flagged_pairs import PAIR_COLUMNS, FlaggedPairLog


class GuidedNegatives(SelectionPolicy):
    """GISTEmbed as a Lightning callback: a frozen guide masks in-batch false negatives.

    What it changes: the contrastive logits (masks, plus the AA/PP blocks). Unbiased: no, by design
    (it removes candidates). Extra cost: one guide forward per new (sample, column); with the cache
    (default) later epochs skip the guide entirely. Reference: Solatorio, "GISTEmbed" (2024);
    numerically identical to sentence-transformers' ``GISTEmbedLoss`` where options coincide.

    ``training_step`` must return an :class:`~lightning_select.rules.contrastive.EmbeddingOutput`; the
    guide reads the raw inputs (e.g. text) of the same rows from the batch columns.

    With :class:`~lightning_select.policies.hardness_weighted_negatives.HardnessWeightedNegatives` in the
    same Trainer, this edit (``order = 300``) runs first in stage 4, whatever the callbacks' order: the
    flagged false negatives are masked to −inf, then the hardness bonus ``α·stopgrad(s)`` goes to the
    negatives that are left (never to a masked entry); GIST's AA/PP blocks get the bonus only with
    ``HardnessWeightedNegatives(same_type_blocks=True)`` (the reference weights query-to-document
    scores only).

    **Two options beyond the reference** (both measured in ``benchmarks/batch_composition.py``):

    - ``false_negatives="attract"``: flagged candidates become extra positives of their row
      (multi-positive InfoNCE, ``ℓ_i = logsumexp(z_i) − mean_{p∈P_i} z_ip``), the attraction variant
      of false-negative cancellation (Huynh et al., 2022), instead of leaving the softmax.
    - ``guide="self"``: the student's own detached embeddings of the step are the guide, as
      Qwen3-Embedding and pplx-embed filter: no guide model runs, nothing is cached, and no second
      forward is made. Those papers mask a candidate whose similarity exceeds the positive's by
      more than 0.1, which is ``margin=-0.1`` with the absolute rule (``θ_i = t_i − m``).

    Args:
        guide: a frozen ``nn.Module`` or callable mapping a column's raw inputs (list of str, tensor,
            …) to ``[b, G]`` embeddings, or a model id/path for :func:`load_guide` (``"minilm"`` =
            the offline all-MiniLM-L6-v2), or ``"self"`` (the student's detached embeddings; the
            cache options are then unused). Guide lookups and the cache live in
            :class:`~lightning_select.guides.lookup.GuideLookup`.
        anchor_column: batch key of the anchors' raw inputs.
        positive_column: batch key of the positives' raw inputs.
        negative_columns: batch keys of hard-negative raw inputs, in the order of the output's
            ``negatives[:, k]``.
        margin_strategy: ``"absolute"`` or ``"relative"``.
        margin: ``m`` in the cut-off (negative: a candidate must beat the positive by ``|m|``).
        false_negatives: ``"drop"`` (GIST: mask flagged candidates) or ``"attract"`` (make them extra
            positives).
        temperature: τ; ``None`` uses the ``EmbeddingOutput``'s temperature.
        contrast_anchors: add the AA block.
        contrast_positives: add the PP block.
        mask_self: also mask AA/PP self-similarities (not in the reference; see the module docs).
        gather_across_devices: use every rank's positives/negatives as candidates (student with
            gradient for the local shard, guide without).
        cache: ``"memory"``, ``"disk"`` (needs ``cache_dir``) or ``None``.
        cache_dtype: ``"float32"`` (exact) or ``"float16"`` (half the memory).
        cache_dir: directory of the disk cache. Under DDP it is one cache shared by every rank of a
            node (``cache_dir/node{k}`` with several nodes): local rank 0 validates and creates
            it, all ranks write disjoint rows in place, and a row a rank misses during training is
            written back for everyone.
        precompute: fill the cache for the whole training set before training (progress bar).
            None (default) means True whenever a cache is used: the cached embeddings are then a
            function of the dataset alone, so a resumed run reproduces them bit for bit. With False
            the cache is filled lazily from the training batches; a guide's output can differ in the
            last bits with the batch it is computed in, so after a resume (which refills a memory
            cache from other batches) guide scores may differ by ~1e-7. Under DDP the work is sharded: each rank embeds 1/W of the uncached samples (disk: into
            the shared files, then a barrier; memory: then an all_gather), so every sample is
            embedded once per node instead of once per rank.
        fingerprint: identifies a non-``nn.Module`` guide for disk-cache invalidation.
        flagged_pairs_path: if set, every flagged pair (anchor index, candidate index, block, guide
            score, threshold, epoch, step) is recorded, checkpointed, and written there
            (.parquet/.csv/.npz) at the end of fit by rank 0. Under DDP the pairs of every rank are
            gathered each step (two small collectives), so one file holds them all.
        record_flagged_pairs: record flagged pairs (for :meth:`flagged_pairs`) even without a path;
            on by default when ``flagged_pairs_path`` is set.
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
        precompute: Optional[bool] = None,
        fingerprint: Optional[str] = None,
        flagged_pairs_path: Optional[str] = None,
        max_flagged_pairs: int = 2_000_000,
        mini_batch_size: Optional[int] = None,
        record_flagged_pairs: Optional[bool] = None,
        false_negatives: FalseNegativeMode = "drop",
    ) -> None:
        who = type(self).__name__
        anchor_column, positive_column = str_option(who, "anchor_column", anchor_column), str_option(
            who, "positive_column", positive_column)
        negative_columns = str_list_option(who, "negative_columns", negative_columns)
        margin = real_option(who, "margin", margin)
        temperature = real_option(who, "temperature", temperature, optional=True)
        for name, flag in (("contrast_anchors", contrast_anchors), ("contrast_positives", contrast_positives),
                           ("mask_self", mask_self), ("gather_across_devices", gather_across_devices)):
            bool_option(who, name, flag)
        int_option(who, "max_flagged_pairs", max_flagged_pairs, minimum=0)
        flagged_pairs_path = path_option(who, "flagged_pairs_path", flagged_pairs_path)
        if mini_batch_size is not None and int_option(who, "mini_batch_size", mini_batch_size) < 1:
            raise ValueError(f"Expected `mini_batch_size` >= 1 (or None), but got {mini_batch_size}.")
        if false_negatives not in FALSE_NEGATIVE_MODES:
            raise ValueError(f"Expected `false_negatives` in {FALSE_NEGATIVE_MODES}, but got {false_negatives!r}.")
        if margin_strategy not in MARGIN_STRATEGIES:
            raise ValueError(f"Expected `margin_strategy` in {MARGIN_STRATEGIES}, but got {margin_strategy!r}.")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"Expected `temperature` > 0 (or None to use the output's), but got {temperature!r}.")
        self.self_guide = isinstance(guide, str) and guide == SELF_GUIDE
        self.columns = [anchor_column, positive_column, *negative_columns]
        self.lookup: Optional[GuideLookup] = None if self.self_guide else GuideLookup(
            guide, self.columns, cache, cache_dtype, cache_dir, precompute, fingerprint, owner=type(self).__name__)
        self.false_negatives: FalseNegativeMode = false_negatives
        self.embedding_chunk_size = mini_batch_size
        self.margin_strategy: MarginStrategy = margin_strategy
        self.margin = float(margin)
        self.temperature = temperature
        self.contrast_anchors, self.contrast_positives, self.mask_self = contrast_anchors, contrast_positives, mask_self
        self.gather_across_devices = gather_across_devices
        self.flagged_pairs_path = flagged_pairs_path
        self.record_flagged_pairs = bool(flagged_pairs_path) if record_flagged_pairs is None else record_flagged_pairs
        self.flagged_log = FlaggedPairLog(max_flagged_pairs)
        self._step_pairs: Optional[dict[str, Tensor]] = None
        #: The flagged-candidate masks of the last training step, per block (own positive and self-pairs excluded).
        self.last_masks: dict[str, Tensor] = {}

    @property
    def guide(self) -> Any:
        return SELF_GUIDE if self.lookup is None else self.lookup.guide

    @property
    def cache(self) -> Optional[GuideEmbeddingCache]:
        return None if self.lookup is None else self.lookup.cache

    @property
    def block_names(self) -> list[str]:
        return ["ap", "aa", "pp"] + [f"an{k}" for k in range(len(self.columns) - 2)]

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lookup is not None:
            self.lookup.attach(pl_module)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.lookup is not None:
            self.lookup.to(pl_module.device)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.lookup is not None:
            self.lookup.open_cache(trainer, getattr(trainer.train_dataloader, "dataset", None), pl_module.device)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        rate = None if self.lookup is None else self.lookup.epoch_hit_rate(reset=True)
        if rate is not None and trainer.logger is not None:
            pl_module.log("gist/cache_hit_rate_epoch", rate, on_step=False, on_epoch=True)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.lookup is not None:
            self.lookup.flush()
        if self.flagged_pairs_path and trainer.is_global_zero:
            self.export_flagged_pairs(self.flagged_pairs_path)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """After a pre-emption the flagged pairs are exported as far as they got."""
        if isinstance(exception, TrainingPreempted):
            self.on_train_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"flagged_pairs": self.flagged_log.state_dict()} if self.record_flagged_pairs else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "flagged_pairs" in state_dict:
            self.flagged_log.load_state_dict(state_dict["flagged_pairs"])

    # ------------------------------------------------------------------ the logit stage
    def edit_logits(self, ctx: StepContext, logits: ContrastiveLogits) -> None:
        k = ctx.embedding_output.num_negative_columns
        if k != len(self.columns) - 2:
            raise SelectionError(
                f"The EmbeddingOutput has {k} hard-negative column(s) but GuidedNegatives was given "
                f"negative_columns={self.columns[2:]}; they must correspond one to one."
            )
        if self.temperature is not None:
            logits.temperature = self.temperature
        candidate_indices = ctx.kept_indices if ctx.phase == "train" else ctx.indices
        if self.lookup is None:  # self-guide: the student's own (gathered) unit embeddings, detached
            if self.gather_across_devices and ctx.world_size > 1:
                _, _, candidate_indices = self._gather_candidates(ctx, logits, None, None)
            emb = logits.embeddings
            g_anchor, g_positive = emb["anchor"].detach(), emb["positive"].detach()
            g_negatives = emb["negatives"].detach() if "negatives" in emb else None
        else:
            guide = self.lookup.embeddings(ctx.sub_batch if ctx.phase == "train" else ctx.batch,
                                           candidate_indices, ctx.module.device)
            g_anchor, g_positive = guide[0], guide[1]
            g_negatives = torch.stack(guide[2:], dim=1) if k else None
            if self.gather_across_devices and ctx.world_size > 1:
                g_positive, g_negatives, candidate_indices = self._gather_candidates(ctx, logits, g_positive,
                                                                                     g_negatives)
        scores = apply_gist(
            logits, g_anchor, g_positive, g_negatives, margin=self.margin, margin_strategy=self.margin_strategy,
            contrast_anchors=self.contrast_anchors, contrast_positives=self.contrast_positives,
            mask_self=self.mask_self, false_negatives=self.false_negatives,
        )
        if ctx.phase == "train":
            self._record(ctx, logits, scores, candidate_indices)

    def _gather_candidates(
        self, ctx: StepContext, logits: ContrastiveLogits, g_positive: Optional[Tensor], g_negatives: Optional[Tensor]
    ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
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
        if g_positive is not None:
            g_positive = ctx.all_gather(g_positive).reshape(world * b, -1)
        if g_negatives is not None:
            g_negatives = ctx.all_gather(g_negatives).reshape(world * b, *g_negatives.shape[1:])
        candidates = ctx.all_gather(ctx.kept_indices).reshape(-1)
        return g_positive, g_negatives, candidates

    # ------------------------------------------------------------------ observability
    def _record(self, ctx: StepContext, logits: ContrastiveLogits, scores: dict[str, Tensor],
                candidate_indices: Tensor) -> None:
        """Per-row false-negative counts for the observers, this step's flagged pairs, and logging."""
        rows = torch.arange(logits.target.shape[0], device=logits.target.device)
        per_row = torch.zeros(rows.numel(), device=rows.device)
        masks: dict[str, Tensor] = {}
        pairs: list[dict[str, Tensor]] = []
        for block in logits.blocks:
            if block.mask is None and block.positive is None:
                continue
            if block.mask is None:
                mask = block.positive
            else:
                mask = block.mask if block.positive is None else block.mask | block.positive
            # Not false negatives: the row's own positive (AP, never masked), and the self-pairs of AA
            # (a_i with a_i) and PP (p_i with p_i), which the rule masks whenever t_i < 1.
            own = {"ap": logits.target, "aa": rows, "pp": logits.target}.get(block.name)
            if own is not None:
                mask = mask.clone()
                mask[rows, own] = False
            masks[block.name] = mask
            per_row += mask.sum(1)
            if self.record_flagged_pairs:
                i, j = mask.nonzero(as_tuple=True)
                cand = ctx.kept_indices if block.name == "aa" else candidate_indices
                pairs.append({
                    "anchor_index": ctx.kept_indices[i].double(), "candidate_index": cand[j].double(),
                    "block": torch.full_like(i, self.block_names.index(block.name)).double(),
                    "guide_score": scores[block.name][i, j].double(), "threshold": scores["threshold"][i].double(),
                })
        ctx.sample_stats["false_negatives"] = per_row
        self.last_masks = masks
        self._step_pairs = {k: torch.cat([p[k] for p in pairs]) for k in pairs[0]} if pairs else None
        if not ctx.should_log:
            return
        for name, value in logits.masked_fraction().items():
            ctx.log(f"gist/masked_fraction_{name}", value)
        if self.false_negatives == "attract":
            for name, value in logits.attracted_fraction().items():
                ctx.log(f"gist/attracted_fraction_{name}", value)
        ctx.log("gist/masked_per_row", per_row.mean())
        ctx.log("gist/threshold_mean", scores["threshold"].mean())
        if self.cache is not None:
            ctx.log("gist/cache_hit_rate", self.lookup.epoch_hit_rate())

    def observe(self, ctx: StepContext) -> None:
        """Append this step's flagged pairs (every rank's, under DDP) to the checkpointed log."""
        if not self.record_flagged_pairs:
            return
        pairs = self._step_pairs
        self._step_pairs = None
        device = ctx.losses.device if ctx.losses is not None else torch.device("cpu")
        if pairs is None or not ctx.has_samples:
            pairs = {k: torch.zeros(0, dtype=torch.float64, device=device) for k in PAIR_COLUMNS[:5]}
        table = torch.stack([pairs[k].to(device) for k in PAIR_COLUMNS[:5]], dim=1)
        if ctx.world_size > 1:  # every rank gets here together
            table = valid_rows(*all_gather_rows(ctx, table))
        n = table.shape[0]
        columns = {k: table[:, c].cpu() for c, k in enumerate(PAIR_COLUMNS[:5])}
        columns["epoch"] = torch.full((n,), float(ctx.trainer.current_epoch), dtype=torch.float64)
        columns["step"] = torch.full((n,), float(ctx.trainer.global_step), dtype=torch.float64)
        self.flagged_log.append(columns)

    def flagged_pairs(self) -> dict[str, Tensor]:
        """Every flagged pair recorded so far (columns of equal length; ``block`` codes index
        :attr:`block_names`: 0=AP, 1=AA, 2=PP, 3+k=AN_k). Needs ``record_flagged_pairs`` (or a path)."""
        if not self.record_flagged_pairs:
            raise SelectionError(
                "GuidedNegatives records flagged pairs only when asked: pass `flagged_pairs_path=...` or "
                "`record_flagged_pairs=True`."
            )
        return self.flagged_log.columns()

    def export_flagged_pairs(self, path: Union[str, Path]) -> Path:
        """Write :meth:`flagged_pairs` to ``.parquet``, ``.csv`` or ``.npz`` (``block`` as its name)."""
        self.flagged_pairs()  # raises the explanatory error when recording is off
        return self.flagged_log.export(path, self.block_names)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns, "margin_strategy": self.margin_strategy, "margin": self.margin,
            "temperature": self.temperature, "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives, "mask_self": self.mask_self,
            "gather_across_devices": self.gather_across_devices,
            "cache": None if self.lookup is None else self.lookup.cache_mode, "false_negatives": self.false_negatives,
            "guide": SELF_GUIDE if self.self_guide else "model",
        }
