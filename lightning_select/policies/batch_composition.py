"""``BatchComposition``: feed a composing batch sampler the embeddings it builds its batches from.

The batches themselves are the sampler's (:class:`~lightning_select.samplers.clustered.ClusteredBatchSampler`,
:class:`~lightning_select.samplers.cluster_reweighted.ClusterReweightedBatchSampler`, any
:class:`~lightning_select.samplers.composed.ComposedBatchSampler`); this callback embeds the training
set (from the guide-embedding cache, or with the student), hands the embeddings to the sampler, keeps
every DDP rank on the same structure, records the cluster losses of the reweighted sampler, carries the
sampler's state across a resume and logs what the batches look like.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_select.core import SelectionError, SelectionPolicy
from lightning_select.core.distributed import raise_together
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option, int_option, str_list_option
from lightning_select.guides.lookup import GuideLookup
from lightning_select.samplers.cluster_reweighted import ClusterReweightedBatchSampler
from lightning_select.samplers.composed import ComposedBatchSampler
from lightning_select.samplers.resumable import carry_state
from lightning_select.stats.history import LossHistory

StudentEmbedding = Callable[[pl.LightningModule, Any], Tensor]


class BatchComposition(SelectionPolicy):
    """Compose batches from an embedding of the training set: clustered (hard negatives) or cluster-reweighted.

    - **What it changes**: the batches (which samples share a batch, and for the reweighted sampler which
      samples an epoch trains), through the training loader's composing batch sampler. Nothing in the
      step: no selection, weight or logit edit.
    - **Unbiased**: no. Clustered batches keep every sample once per epoch but change which negatives
      a sample meets (harder ones: the point, and more false negatives, which ``GuidedNegatives``
      removes). The reweighted sampler trains high-loss clusters more often, without importance weights.
    - **Extra cost**: ``source="guide"``: no guide pass of its own when a ``GuidedNegatives`` in the same
      Trainer has (or is made to fill) its guide-embedding cache; k-means over ``[N, G]`` on rank 0 at
      each refresh. ``source="student"``: one no-grad eval-mode forward pass over the training set per
      refresh (each rank embeds ``1/W`` of it, then one ``all_gather``). Under DDP one broadcast of the
      sampler's structure per refresh, and a boolean all-reduce per check.
    - **Reference**: clustered batches as in NGAME (Dahiya et al., 2023), TAS-B topic-aware sampling
      (Hofstätter et al., 2021) and Arctic-embed (Merrick et al., 2024); cluster reweighting in the style
      of Diversify-and-Conquer (Yu et al., 2024), with the training loss as the cluster signal. Checked
      against the papers' descriptions, not against their code.
    - **Defaults**: ``source="guide"``, the anchor column, no refresh after the first
      (``refresh_every_n_epochs=0``), the EMA loss of ``LossHistory``. The sampler's own defaults:
      ``num_clusters=10``, ``mix=0`` (clustered); ``budget=0.5``, ``temperature=1``,
      ``max_cluster_share=0.5`` (reweighted): this project's choices, not a paper's.

    **When.** The first structure is set at ``on_train_start`` (unless a checkpoint restored one), later
    ones at ``on_train_epoch_start`` of every ``refresh_every_n_epochs``-th epoch. Lightning's fit loop
    (2.6, ``FitLoop.on_advance_start``) calls ``on_train_epoch_start`` after ``set_epoch`` and before
    the epoch's first batch is drawn: from epoch 1 on the loader's iterator is created after the hook
    (``_TrainingEpochLoop.on_run_start``); in the first epoch it is created earlier, in
    ``FitLoop.setup_data``, but a sized loader is not prefetched and
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader` (what the datamodules' factories
    build) asks the batch sampler for its batches only at the first batch. So a refresh is used by the
    very epoch it starts (tested). A plain ``DataLoader`` would draw the first epoch's batches before
    ``on_train_start``, before any structure exists.

    Refreshes happen at epoch granularity only: an epoch's plan must be fixed at its start, since a
    mid-epoch resume re-plans the epoch from the checkpointed structure and skips the batches already
    trained, and every DDP rank must cut the same global batches from the same structure.

    **DDP.** Every rank embeds (guide cache: reads; student: its shard, then ``all_gather``), rank 0 runs
    the clustering and broadcasts the sampler's state, so every rank holds the identical structure.
    Problems found on one rank are raised on every rank together. ``LossHistory`` holds every rank's
    rows, so the reweighted sampler's losses are the same on every rank without a collective.

    **Resume.** ``state_dict`` holds the sampler's state (structure, losses) and the epoch of the last
    refresh; a resumed run gives it to the new loader's sampler before the first batch, so the batch
    sequence is reproduced exactly, mid-epoch too.

    Logged each epoch (``batch_composition/…``): ``purity`` (the share of a batch's clustered part in its
    most common cluster), ``num_clusters``, ``largest_cluster_share``, ``refresh_seconds`` (epochs
    with a refresh) and, for the reweighted sampler, ``max_weight_share`` and ``weight_entropy``.

    Args:
        source: ``"guide"`` (guide embeddings) or ``"student"`` (the trained model's embeddings).
        columns: batch columns whose guide embeddings are used; several are averaged as unit vectors.
            Default: the anchor column of the ``GuidedNegatives`` in the Trainer, or ``("anchor",)``.
        guide: a guide of its own (as for ``GuidedNegatives``), used when the Trainer has no
            ``GuidedNegatives``: with one, its cache is read instead (no second guide pass).
        guide_columns: the columns the own guide embeds and caches (default ``columns``). To share a
            ``cache_dir`` with a ``GuidedNegatives``, give its columns (anchor, positive, negatives).
        cache, cache_dtype, cache_dir, fingerprint: the own guide's cache, as for ``GuidedNegatives``
            (the cache is always filled before training).
        student_embedding: ``fn(pl_module, batch) -> [B, D]``; default ``pl_module.cluster_embedding(batch)``.
        refresh_every_n_epochs: re-embed and re-cluster at the start of every n-th epoch (0: never again).
        loss_statistic: ``"ema"`` or ``"last"`` loss of ``LossHistory`` for the reweighted sampler.
        embed_batch_size: samples per forward of the student pass.
        progress: show a progress bar (rank 0) during the student pass.

    Example::

        >>> from functools import partial
        >>> from lightning_select.data import DigitsPairsDataModule
        >>> from lightning_select.samplers import ClusteredBatchSampler
        >>> data = DigitsPairsDataModule(batch_sampler=partial(ClusteredBatchSampler, num_clusters=10, mix=0.25))
        >>> policy = BatchComposition(source="student", refresh_every_n_epochs=1)
        >>> # Trainer(callbacks=[policy]).fit(DigitsEmbeddingModule(), data)  ->  policy.sampler.cluster_ids
    """

    order = 950
    needs_per_sample_loss = False

    def __init__(self, source: Literal["guide", "student"] = "guide", columns: Optional[Sequence[str]] = None,
                 guide: Optional[Union[nn.Module, Callable[[Any], Tensor], str]] = None,
                 guide_columns: Optional[Sequence[str]] = None, cache: Optional[Literal["memory", "disk"]] = "memory",
                 cache_dtype: Literal["float32", "float16"] = "float32", cache_dir: Optional[str] = None,
                 fingerprint: Optional[str] = None, student_embedding: Optional[StudentEmbedding] = None,
                 refresh_every_n_epochs: int = 0, loss_statistic: Literal["ema", "last"] = "ema",
                 embed_batch_size: int = 256, progress: bool = True) -> None:
        who = type(self).__name__
        if source not in ("guide", "student"):
            raise ValueError(f"{who}: expected `source` to be 'guide' or 'student', but got {source!r}.")
        self.columns = None if columns is None else str_list_option(who, "columns", columns)
        if self.columns is not None and not self.columns:
            raise ValueError(f"{who}: `columns` is empty; name at least one batch column (e.g. ['anchor']).")
        if source == "student" and (guide is not None or columns is not None):
            raise ValueError(f"{who}: `guide`/`columns` are options of source='guide', but source='student'; drop "
                             "them or use source='guide'.")
        if source == "guide" and student_embedding is not None:
            raise ValueError(f"{who}: `student_embedding` is an option of source='student', but source='guide'.")
        if student_embedding is not None and not callable(student_embedding):
            raise TypeError(f"{who}: expected `student_embedding` to be a callable fn(pl_module, batch) -> [B, D], "
                            f"but got {type(student_embedding).__name__}.")
        if guide is not None and cache is None:
            raise ValueError(f"{who}: the own guide's embeddings are read from its cache; set `cache='memory'` or "
                             "'disk', not None.")
        self.refresh_every_n_epochs = int_option(who, "refresh_every_n_epochs", refresh_every_n_epochs, minimum=0)
        if loss_statistic not in ("ema", "last"):
            raise ValueError(f"{who}: expected `loss_statistic` 'ema' or 'last', but got {loss_statistic!r}.")
        self.embed_batch_size = int_option(who, "embed_batch_size", embed_batch_size, minimum=1)
        self.progress = bool_option(who, "progress", progress)
        self.source, self.loss_statistic, self.student_embedding = source, loss_statistic, student_embedding
        self._lookup: Optional[GuideLookup] = None
        if guide is not None:
            own = str_list_option(who, "guide_columns", guide_columns) if guide_columns is not None else None
            self.columns = self.columns or (own[:1] if own else ["anchor"])
            self._lookup = GuideLookup(guide, own or self.columns, cache, cache_dtype, cache_dir, True, fingerprint,
                                       owner=who)
        self._sampler: Optional[ComposedBatchSampler] = None
        self._pending: Optional[dict[str, Any]] = None
        self._last_refresh: Optional[int] = None
        self._refresh_seconds: Optional[float] = None

    @property
    def sampler(self) -> Optional[ComposedBatchSampler]:
        """The training loader's composing batch sampler (None before ``on_train_start``)."""
        return self._sampler

    # ------------------------------------------------------------------ finding things
    def _attach(self, trainer: "pl.Trainer") -> ComposedBatchSampler:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, ComposedBatchSampler):
            raise SelectionError(
                f"BatchComposition needs the training DataLoader's batch_sampler to be a ComposedBatchSampler "
                f"(e.g. ClusteredBatchSampler), but got {type(sampler).__name__} (loader {type(loader).__name__}). "
                "Give the datamodule a sampler factory: `batch_sampler=functools.partial(ClusteredBatchSampler, "
                "num_clusters=10)` (DigitsPairsDataModule, QuoraDuplicatesDataModule, SickDataModule).")
        if sampler is not self._sampler:
            carry_state(sampler, self._sampler, self._pending)
            self._sampler, self._pending = sampler, None
        return sampler

    @staticmethod
    def _history(trainer: "pl.Trainer") -> LossHistory:
        found = [cb for cb in trainer.callbacks if isinstance(cb, LossHistory)]
        if not found:
            raise SelectionError(
                "BatchComposition with a ClusterReweightedBatchSampler reweights clusters by their recorded losses, "
                "but the Trainer has no LossHistory callback; add `LossHistory()` to the Trainer's callbacks "
                "(Hydra: +selector=[cluster_reweighted,loss_history]).")
        return found[0]

    def _guide_lookup(self, trainer: "pl.Trainer") -> tuple[GuideLookup, list[str]]:
        from lightning_select.policies.guided_negatives import GuidedNegatives

        # a self-guided GuidedNegatives (guide="self") runs no guide model and has no cache to reuse
        gist = next((cb for cb in trainer.callbacks if isinstance(cb, GuidedNegatives) and cb.lookup is not None), None)
        if gist is not None:  # first choice: its cache, so no second guide pass
            lookup = gist.lookup
            if lookup.cache_mode is None:
                raise SelectionError("BatchComposition(source='guide') reuses the GuidedNegatives guide-embedding "
                                     "cache, but that GuidedNegatives has cache=None; set its cache='memory' or "
                                     "'disk'.")
        elif self._lookup is not None:
            lookup = self._lookup
        else:
            raise SelectionError(
                "BatchComposition(source='guide') reads guide embeddings, but it has no `guide=` and the Trainer "
                "has no GuidedNegatives callback whose cache it could reuse; add GuidedNegatives, pass "
                "`guide=`, or use source='student'.")
        columns = self.columns or lookup.columns[:1]
        missing = [c for c in columns if c not in lookup.input_columns]
        if missing:
            raise SelectionError(f"BatchComposition: the guide lookup caches the columns {lookup.input_columns}, not "
                                 f"{missing}; set `columns` to some of them.")
        return lookup, columns

    def _check_student(self, pl_module: "pl.LightningModule") -> None:
        if self.student_embedding is None and not callable(getattr(pl_module, "cluster_embedding", None)):
            raise SelectionError(
                f"BatchComposition(source='student'): a refresh requested but no student embedding function: pass "
                f"`student_embedding=fn(pl_module, batch) -> [B, D]` or give {type(pl_module).__name__} a "
                "`cluster_embedding(batch)` method.")

    # ------------------------------------------------------------------ embeddings
    def _guide_embeddings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Tensor:
        lookup, columns = self._guide_lookup(trainer)
        cache = lookup.cache
        assert cache is not None
        if cache.missing_rows().numel():  # a lazily filled cache (precompute=False): every rank completes its own
            lookup.fill_cache(trainer.train_dataloader.dataset, pl_module.device, show_progress=trainer.is_global_zero)
        assert cache.values is not None
        index = [lookup.input_columns.index(c) for c in columns]
        return F.normalize(cache.values[:, index].float(), dim=-1).mean(1)

    def _student_rows(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", rows: Tensor) -> Tensor:
        from torch.utils.data import default_collate
        from tqdm.auto import tqdm

        dataset = trainer.train_dataloader.dataset
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        out: list[Tensor] = []
        try:
            with torch.no_grad():
                starts = range(0, rows.numel(), self.embed_batch_size)
                for a in tqdm(starts, desc="student embeddings", leave=False,
                              disable=not (self.progress and trainer.is_global_zero)):
                    chunk = rows[a:a + self.embed_batch_size].tolist()  # no DataLoader: no global RNG is drawn
                    batch = move_data_to_device(default_collate([dataset[i] for i in chunk]), pl_module.device)
                    e = (self.student_embedding(pl_module, batch) if self.student_embedding is not None
                         else pl_module.cluster_embedding(batch))
                    if not isinstance(e, Tensor) or e.dim() != 2 or e.shape[0] != len(chunk):
                        raise SelectionError(
                            f"BatchComposition: the student embedding function must return a [{len(chunk)}, D] tensor "
                            f"for a batch of {len(chunk)} samples, but returned {type(e).__name__} "
                            f"{tuple(getattr(e, 'shape', ()))}.")
                    out.append(e.detach().float().cpu())
        finally:
            for module, training in modes:
                module.training = training
        return torch.cat(out) if out else torch.zeros(0, 0)

    def _gather(self, trainer: "pl.Trainer", local: Tensor, n: int, device: torch.device) -> Tensor:
        """Every rank's ``rows[r::W]`` embeddings put back in index order (one ``all_gather`` of padded rows)."""
        world = trainer.world_size
        if world == 1:
            return local
        gather = trainer.strategy.all_gather
        dim = int(gather(torch.tensor([local.shape[1]], device=device)).max())
        width = -(-n // world)
        padded = torch.zeros(width, dim, device=device)
        padded[: local.shape[0]] = local.to(device)
        everyone = gather(padded).reshape(world, width, dim).cpu()
        full = torch.empty(n, dim)
        for r in range(world):
            rows = torch.arange(r, n, world)
            full[rows] = everyone[r, : rows.numel()]
        return full

    # ------------------------------------------------------------------ the refresh
    def refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Embed the training set, cluster on rank 0 and give every rank's sampler the same structure."""
        sampler = self._attach(trainer)
        start, n = time.perf_counter(), sampler.num_samples
        problem, local = None, torch.zeros(0, 0)
        if self.source == "guide":
            lookup, _ = self._guide_lookup(trainer)
            lookup.open_cache(trainer, trainer.train_dataloader.dataset, pl_module.device)  # every rank: collectives
        try:
            if self.source == "guide":
                local = self._guide_embeddings(trainer, pl_module)
            else:
                local = self._student_rows(trainer, pl_module, torch.arange(trainer.global_rank, n, trainer.world_size))
        except Exception as err:  # noqa: BLE001  (raised on every rank together, below)
            problem = f"{type(err).__name__}: {err}"
        raise_together(trainer, problem, "BatchComposition could not embed the training set.")
        embeddings = local if self.source == "guide" else self._gather(trainer, local, n, pl_module.device)
        payload: tuple[Optional[str], Optional[dict[str, Any]]] = (None, None)
        if trainer.is_global_zero:
            try:
                sampler.set_embeddings(embeddings)
                payload = (None, sampler.state_dict())
            except (ValueError, RuntimeError, SelectionError) as err:
                payload = (f"{type(err).__name__}: {err}", None)
        problem, state = trainer.strategy.broadcast(payload, src=0) if trainer.world_size > 1 else payload
        if problem is not None:
            raise SelectionError(f"BatchComposition could not build the sampler's structure on rank 0: {problem}")
        if not trainer.is_global_zero:
            assert state is not None
            sampler.load_state_dict(state)
        self._last_refresh = trainer.current_epoch
        self._refresh_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._lookup is not None:
            self._lookup.attach(pl_module)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._lookup is not None:
            self._lookup.to(pl_module.device)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        problem: Optional[str] = None
        try:
            sampler = self._attach(trainer)
            if (sampler.num_replicas, sampler.rank) != (trainer.world_size, trainer.global_rank):
                raise SelectionError(
                    f"its {type(sampler).__name__} was built for num_replicas={sampler.num_replicas}, rank="
                    f"{sampler.rank}, but this process is rank {trainer.global_rank} of {trainer.world_size}; build "
                    "it through the datamodule's `batch_sampler=` factory (it passes both).")
            if isinstance(sampler, ClusterReweightedBatchSampler):
                self._history(trainer)
            if self.source == "guide":
                self._guide_lookup(trainer)
            else:
                self._check_student(pl_module)
        except (SelectionError, ValueError) as err:
            problem = str(err)
        raise_together(trainer, problem, "BatchComposition cannot compose this run's batches.")
        if not sampler.ready:
            self.refresh(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sampler = self._attach(trainer)
        epoch, every = trainer.current_epoch, self.refresh_every_n_epochs
        if every and epoch % every == 0 and self._last_refresh != epoch:
            self.refresh(trainer, pl_module)
        self._log(pl_module, sampler, epoch)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sampler = self._attach(trainer)
        if isinstance(sampler, ClusterReweightedBatchSampler):
            history = self._history(trainer)
            store = history.store  # flushed
            if store is not None:
                sampler.update_cluster_losses(store.ema_loss if self.loss_statistic == "ema" else store.last_loss)

    def _log(self, pl_module: "pl.LightningModule", sampler: ComposedBatchSampler, epoch: int) -> None:
        stats: dict[str, float] = {}
        purity = getattr(sampler, "purity", None)
        if callable(purity):
            stats["purity"] = float(purity(epoch))
        sizes = getattr(sampler, "cluster_sizes", None)
        if callable(sizes):
            counts = sizes().double()
            stats["num_clusters"] = float((counts > 0).sum())
            stats["largest_cluster_share"] = float(counts.max() / counts.sum())
        if isinstance(sampler, ClusterReweightedBatchSampler):
            mass = sampler.cluster_mass()
            stats["max_weight_share"] = float(mass.max())
            stats["weight_entropy"] = float(-(mass[mass > 0] * mass[mass > 0].log()).sum())
        sampler_stats = getattr(sampler, "stats", None)  # e.g. NeighbourExclusionBatchSampler: pairs, collisions
        if callable(sampler_stats):
            stats.update({k: float(v) for k, v in sampler_stats().items()})
        if self._refresh_seconds is not None:
            stats["refresh_seconds"], self._refresh_seconds = self._refresh_seconds, None
        for name, value in stats.items():
            pl_module.log(f"batch_composition/{name}", value, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        sampler = self._sampler.state_dict() if self._sampler is not None else self._pending
        return {"sampler": sampler, "last_refresh": self._last_refresh}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_refresh = state_dict.get("last_refresh")
        self._pending = state_dict.get("sampler")
        if self._sampler is not None and self._pending is not None:
            self._sampler.load_state_dict(self._pending)
            self._pending = None
