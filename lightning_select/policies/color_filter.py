"""``ColorFilter`` (CoLoR-Filter): offline selection of the training samples that a target set makes
more likely, and the builder of its subset file.

:func:`build_color_subset` trains (or loads) a *prior* model on the candidates, fine-tunes a copy on
the *target* data (the *conditional* model), scores every candidate with both (no-grad forwards) and
writes the subset file (:mod:`lightning_select.data.subset_file`) with the global top ``1/τ`` by
``prior loss − conditional loss``. The datamodule trains on it (``sampler="subset_file"``, a
:class:`~lightning_select.samplers.subset.SubsetSampler`); :class:`ColorFilter` builds the file on
first use, checks it against the training set and checks that every trained row is in the subset.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.distributed import build_on_rank_zero, raise_together
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option, int_option, path_option, real_option, str_option
from lightning_select.data.subset_file import BUILD_HINT, SubsetFile, load_subset_file, write_subset_file
from lightning_select.io import scatter_by_index
from lightning_select.policies.reducible_loss import (
    _private_rng,
    fresh_copy_factory,
    score_samples,
    train_il_model,
    training_targets,
)
from lightning_select.rules.color_filter import color_scores, keep_of, selection_weights, top_fraction_mask

PathLike = Union[str, "os.PathLike[str]"]
#: the options recorded in a subset file's ``meta`` that ColorFilter(check_options=True) compares with its own
CHECKED_OPTIONS = ("keep", "stratify", "prior_epochs", "conditional_epochs", "prior_fraction", "temperature",
                   "seed", "conditional_target_key")


class _Relabelled:
    """Re-iterable view of ``loader`` whose batches carry ``batch[source]`` under ``dest`` (the target labels
    under the key the model's ``training_step`` reads)."""

    def __init__(self, loader: Iterable, source: str, dest: str) -> None:
        self.loader, self.source, self.dest = loader, source, dest

    def __iter__(self) -> Any:
        for batch in self.loader:
            if not isinstance(batch, dict) or self.source not in batch:
                raise SelectionError(f"CoLoR-Filter: the target batches hold no {self.source!r} key; set "
                                     f"`conditional_target_key` to the key of the target labels.")
            yield {**batch, self.dest: batch[self.source]}

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def _load_prior(model: nn.Module, prior_state: PathLike) -> None:
    state = torch.load(prior_state, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        state = state["state_dict"]
    model.load_state_dict(state)


def _scored(model: nn.Module, loader: Iterable, n: int, target_key: str, index_key: Any, desc: str,
            progress: bool) -> tuple[Tensor, Tensor]:
    """``[n]`` losses and targets by sample index, no grad, eval mode, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    indices, losses, targets = score_samples(model, bar, target_key, index_key)
    bad = int((~torch.isfinite(losses)).sum())
    if bad:
        raise SelectionError(f"CoLoR-Filter: the {desc.split(':')[-1].strip()} gave non-finite losses for {bad} "
                             f"samples; lower the learning rate or the epochs.")
    columns = scatter_by_index(n, indices, {"loss": losses, "targets": targets})
    return columns["loss"], columns["targets"]


def build_color_subset(model_factory: Callable[[], nn.Module], prior_loader: Iterable, target_loader: Iterable,
                       score_loader: DataLoader, path: PathLike, *, tau: Optional[float] = None,
                       keep: Optional[float] = None, prior_epochs: int = 20, conditional_epochs: int = 20,
                       lr: float = 1e-3, conditional_lr: Optional[float] = None, weight_decay: float = 1e-2,
                       seed: int = 0, target_key: str = "label", conditional_target_key: str = "clean_label",
                       index_key: Union[str, int] = "index", temperature: Optional[float] = None,
                       stratify: bool = False, prior_state: Optional[PathLike] = None, progress: bool = True,
                       meta: Optional[dict] = None) -> Path:
    """Build a CoLoR-Filter subset file at ``path`` and return the path.

    1. **Prior**: ``model_factory()`` (seeded with ``seed``) trained for ``prior_epochs`` on
       ``prior_loader`` (the candidates, or a subset of them) with AdamW on its own ``training_step``
       per-sample loss; or, with ``prior_state``, loaded from that state dict / Lightning checkpoint.
    2. **Conditional**: a copy of the prior fine-tuned for ``conditional_epochs`` on ``target_loader``,
       whose batches' ``conditional_target_key`` labels are fed as ``target_key`` (for noisy digits: the
       holdout split's clean labels).
    3. **Scores**: both models score every sample of ``score_loader`` (the training set in index order,
       augmentation off, no grad); ``score = prior loss − conditional loss``; the global top
       ``⌊N/τ⌋`` (:func:`~lightning_select.rules.color_filter.top_fraction_mask`) are kept, with weights
       :func:`~lightning_select.rules.color_filter.selection_weights` (1, or a softmax at ``temperature``).
       With ``stratify`` the top ``1/τ`` of each training label are kept instead (not in the paper: on noisy
       digits the global top can drop most of a class, see ``benchmarks/results/color_filter.md``).

    The global RNG state of the caller is left untouched (the builds run in a forked RNG).
    """
    fraction = keep_of(tau, keep)
    n = len(score_loader.dataset)  # type: ignore[arg-type]
    with _private_rng():
        torch.manual_seed(seed)
        prior = model_factory()
        if prior_state is not None:
            _load_prior(prior, prior_state)
        else:
            train_il_model(prior, prior_loader, prior_epochs, lr, weight_decay, seed, progress, "CoLoR prior model")
        conditional = copy.deepcopy(prior)
        targets_in = target_loader if conditional_target_key == target_key else \
            _Relabelled(target_loader, conditional_target_key, str(target_key))
        train_il_model(conditional, targets_in, conditional_epochs, conditional_lr or lr, weight_decay, seed + 1,
                       progress, "CoLoR conditional model (fine-tune on target)")
        prior_loss, targets = _scored(prior, score_loader, n, target_key, index_key, "scoring: prior model", progress)
        cond_loss, _ = _scored(conditional, score_loader, n, target_key, index_key, "scoring: conditional model",
                               progress)
    scores = color_scores(prior_loss, cond_loss)
    kept = top_fraction_mask(scores, fraction, groups=targets if stratify else None)
    weights = selection_weights(scores, kept, temperature)
    info = {"keep": fraction, "tau": None if tau is None else float(tau), "stratify": bool(stratify),
            "prior_epochs": prior_epochs,
            "conditional_epochs": conditional_epochs, "lr": lr, "conditional_lr": conditional_lr or lr,
            "seed": seed, "temperature": temperature, "target_key": target_key,
            "conditional_target_key": conditional_target_key,
            "prior_state": None if prior_state is None else str(prior_state),
            "prior_samples": _size(prior_loader), "target_samples": _size(target_loader), **(meta or {})}
    return write_subset_file(path, prior_loss, cond_loss, kept, weights, targets, info)


def _size(loader: Any) -> Optional[int]:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else None


def build_color_subset_from_datamodule(datamodule: Any, model_factory: Callable[[], nn.Module], path: PathLike, *,
                                       batch_size: int = 64, prior_fraction: float = 1.0, seed: int = 0,
                                       **options: Any) -> Path:
    """:func:`build_color_subset` with a datamodule's splits: the prior trains on the training set
    (``datamodule.scoring_dataloader().dataset``; a seeded ``prior_fraction`` of it), the conditional
    model on ``datamodule.holdout_dataloader()``, and the training set is scored in index order."""
    for needed in ("holdout_dataloader", "scoring_dataloader"):
        if not hasattr(datamodule, needed):
            raise SelectionError(
                f"CoLoR-Filter: the datamodule ({type(datamodule).__name__}) has no {needed}() to build the subset "
                f"file from (the target split and the training set in index order); {BUILD_HINT}.")
    score_loader = datamodule.scoring_dataloader()
    train_set = score_loader.dataset
    if prior_fraction < 1.0:
        count = max(1, round(prior_fraction * len(train_set)))
        chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        train_set = Subset(train_set, chosen.tolist())
    prior_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    target_loader = datamodule.holdout_dataloader(batch_size=batch_size, shuffle=True)
    if len(target_loader.dataset) == 0:
        raise SelectionError(f"CoLoR-Filter: the datamodule's holdout (target) split is empty; set "
                             f"holdout_fraction > 0 or build the file yourself; {BUILD_HINT}.")
    index_key = getattr(datamodule, "index_key", "index")
    return build_color_subset(model_factory, prior_loader, target_loader, score_loader, path, seed=seed,
                              index_key=index_key, meta={"prior_fraction": prior_fraction, "batch_size": batch_size},
                              **options)


class ColorFilter(SelectionPolicy):
    """CoLoR-Filter: train on the candidates whose loss the target data reduced the most (Brandfonbrener et al., 2024).

    - **What it changes**: the selection, offline and once. The datamodule trains every epoch on the
      global top ``⌊N/τ⌋`` of the training set by ``prior loss − conditional loss``, read from the
      subset file (``sampler="subset_file"``). This callback builds the file when it is missing, checks
      it, and checks every step that the trained rows are in the subset; it changes nothing in the step.
    - **Unbiased**: no, by design: the gradient is the plain mean over the kept subset (the paper's
      rule), not over the training set. ``temperature`` with ``subset_weighted=True`` also favours high
      scores within the subset (not in the paper).
    - **Extra cost**: once, the prior's training (none with ``prior_state``), the conditional model's
      fine-tune and ``2N`` no-grad forward passes (both models score every training sample). Per step,
      nothing beyond the engine's shared gather of the trained rows; ``N`` bools and ``N`` floats on the
      device.
    - **Reference**: "CoLoR-Filter: Conditional Loss Reduction Filtering for Targeted Language Model
      Pre-training", NeurIPS 2024. Checked against the selection script of its public implementation
      (github.com/davidbrandfonbrener/color-filter-olmo, ``scripts/select_index_np.py``): score = prior
      − conditional loss, keep the top ``int(N·select_frac)``. Here ties go to the lower index (its
      ``argsort`` leaves them unspecified).
    - **Defaults**: ``tau=4`` (the paper sweeps τ and has no single default). The paper's prior trains on
      separate prior data; here, for lack of it, the prior trains on the candidates themselves (or a
      seeded ``prior_fraction`` of them; or load any prior with ``build_color_subset(prior_state=...)``),
      and the conditional model fine-tunes on the datamodule's holdout split with its *clean* labels
      (``conditional_target_key="clean_label"``), the target distribution of the noisy-label harness.
      ``stratify`` (per-label top ``1/τ``) and ``temperature`` are deviations, off by default.

    **The subset file** (``subset_path``, :mod:`lightning_select.data.subset_file`) is built at
    ``setup`` when missing and ``build_if_missing``: the prior is a fresh instance of the module's class
    with a copy of its initial weights, trained with AdamW (a plain loop, progress bars) for
    ``prior_epochs`` on the training set (``datamodule.scoring_dataloader().dataset``), the conditional
    model a copy fine-tuned for ``conditional_epochs`` on ``datamodule.holdout_dataloader()``; rank 0
    builds, the other ranks wait. At ``on_train_start`` every rank checks the file against the training
    set's targets and (``check_options``) that it was built with this callback's options, so a stale
    file is an error, not a silent reuse; under DDP it also checks that the training loader is sharded
    by a ``DistributedSampler`` (Lightning's default). Each step it checks, from the gathered indices of
    every rank, that every trained row is in the subset (a loader that ignores the file is an error).

    Logs ``color/kept_share`` (kept / N), ``color/score_mean`` (mean file score of the trained rows).

    Args:
        subset_path: the subset file.
        tau: the selection ratio (> 1): keep ``⌊N/τ⌋``. Pass ``tau=None`` with ``keep`` instead.
        keep: the kept fraction in (0, 1] (exclusive with ``tau``).
        build_if_missing: build the file from the datamodule's splits when it is missing.
        prior_epochs, conditional_epochs: epochs of the prior model and of the conditional fine-tune.
        lr, conditional_lr: AdamW learning rates; None: the module's ``hparams.lr`` (and ``lr``).
        batch_size: batch size of the prior and conditional training.
        prior_fraction: share of the training set the prior trains on (a seeded subset), in (0, 1].
        target_key: batch key of the training labels (stored in, and checked against, the file).
        conditional_target_key: batch key of the target split's labels the conditional model fits.
        stratify: keep the top ``1/τ`` of each training label instead of the global top (not in the paper;
            measured on noisy digits: it avoids dropping most of a class, see the README).
        temperature: None (uniform over the kept, the paper) or softmax weights at this temperature,
            used by the datamodule's ``subset_weighted=True``.
        seed: seed of the prior subset, the model training and the loaders.
        check_options: refuse a file built with other options (see ``CHECKED_OPTIONS``).
        progress: tqdm bars while building.

    Example::

        >>> policy = ColorFilter("outputs/color_subsets/digits.pt", tau=4)
        >>> policy.keep, policy.needs_scores
        (0.25, False)
        >>> # Trainer(callbacks=[policy]).fit(NoisyLabelClassifier(), NoisyDigitsDataModule(
        >>> #     sampler="subset_file", subset_path="outputs/color_subsets/digits.pt"))
    """

    order = 940
    needs_global_rows = True

    def __init__(self, subset_path: PathLike, tau: Optional[float] = 4.0, keep: Optional[float] = None,
                 build_if_missing: bool = True, prior_epochs: int = 20, conditional_epochs: int = 20,
                 lr: Optional[float] = None, conditional_lr: Optional[float] = None, batch_size: int = 64,
                 prior_fraction: float = 1.0, target_key: str = "label", conditional_target_key: str = "clean_label",
                 temperature: Optional[float] = None, stratify: bool = False, seed: int = 0,
                 check_options: bool = True,
                 progress: bool = True) -> None:
        who = type(self).__name__
        self.subset_path = path_option(who, "subset_path", subset_path, optional=False)
        self.keep = keep_of(tau, keep)
        self.tau = tau
        self.build_if_missing = bool_option(who, "build_if_missing", build_if_missing)
        self.prior_epochs = int_option(who, "prior_epochs", prior_epochs, minimum=1)
        self.conditional_epochs = int_option(who, "conditional_epochs", conditional_epochs, minimum=1)
        self.lr = real_option(who, "lr", lr, optional=True)
        self.conditional_lr = real_option(who, "conditional_lr", conditional_lr, optional=True)
        for name in ("lr", "conditional_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{who}: expected a positive `{name}` (or None for the module's lr), but got "
                                 f"{getattr(self, name)}.")
        self.batch_size = int_option(who, "batch_size", batch_size, minimum=1)
        self.prior_fraction = real_option(who, "prior_fraction", prior_fraction)
        if not 0.0 < self.prior_fraction <= 1.0:
            raise ValueError(f"{who}: expected `prior_fraction` in (0, 1], but got {prior_fraction}.")
        self.target_key = str_option(who, "target_key", target_key)
        self.conditional_target_key = str_option(who, "conditional_target_key", conditional_target_key)
        self.temperature = real_option(who, "temperature", temperature, optional=True)
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"{who}: expected a positive `temperature` (or None), but got {temperature}.")
        self.stratify = bool_option(who, "stratify", stratify)
        self.seed = int_option(who, "seed", seed)
        self.check_options = bool_option(who, "check_options", check_options)
        self.progress = bool_option(who, "progress", progress)
        self.subset: Optional[SubsetFile] = None
        self._kept: Optional[Tensor] = None
        self._scores: Optional[Tensor] = None
        self.steps, self.trained_rows = 0, 0
        self.score_sum = torch.zeros((), dtype=torch.float64)
        self._restored: Optional[tuple[int, int]] = None

    def options(self, module_lr: float) -> dict[str, Any]:
        """The options a file built by this callback records (``meta``)."""
        lr = self.lr or module_lr
        return {"keep": self.keep, "tau": self.tau, "stratify": self.stratify, "prior_epochs": self.prior_epochs,
                "conditional_epochs": self.conditional_epochs, "lr": lr, "conditional_lr": self.conditional_lr or lr,
                "prior_fraction": self.prior_fraction, "temperature": self.temperature, "seed": self.seed,
                "conditional_target_key": self.conditional_target_key}

    # ---------------------------------------------------------------- the file
    def build_file(self, trainer: Any, pl_module: Any) -> Path:
        """Build the subset file from ``trainer.datamodule`` (see the class docstring)."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise SelectionError(f"ColorFilter: no subset file at {self.subset_path!r}, and no datamodule to build "
                                 f"one from; {BUILD_HINT}.")
        lr = self.lr or float(getattr(pl_module, "hparams", {}).get("lr", 1e-3))
        return build_color_subset_from_datamodule(
            datamodule, fresh_copy_factory(pl_module, trainer.strategy.root_device), self.subset_path,
            batch_size=self.batch_size, prior_fraction=self.prior_fraction, seed=self.seed, tau=None, keep=self.keep,
            prior_epochs=self.prior_epochs, conditional_epochs=self.conditional_epochs, lr=lr,
            conditional_lr=self.conditional_lr, target_key=self.target_key,
            conditional_target_key=self.conditional_target_key, temperature=self.temperature, stratify=self.stratify,
            progress=self.progress)

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        missing = not Path(self.subset_path).is_file()
        problem = None  # every rank takes part in the collectives below, whatever it found
        if missing and not self.build_if_missing:
            problem = f"No subset file at {self.subset_path!r} (build_if_missing=False); {BUILD_HINT}."
        build_on_rank_zero(trainer, (lambda: self.build_file(trainer, pl_module)) if missing else None,
                           "ColorFilter has no usable subset file.", "color_filter_subset", problem)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        problem = None
        try:
            targets = training_targets(trainer, self.target_key, getattr(datamodule, "index_key", "index"),
                                       owner="ColorFilter")
            self.subset = load_subset_file(self.subset_path, targets)
            self._check(trainer, pl_module, self.subset)
        except SelectionError as err:
            problem = str(err)
        raise_together(trainer, problem, "ColorFilter: the subset file cannot be used.")
        assert self.subset is not None
        self._kept = self.subset.kept.to(pl_module.device)
        self._scores = self.subset.scores.to(pl_module.device)

    def _check(self, trainer: Any, pl_module: Any, subset: SubsetFile) -> None:
        if self.check_options:
            module_lr = float(getattr(pl_module, "hparams", {}).get("lr", 1e-3))
            mine = self.options(module_lr)
            differ = {k: (subset.meta[k], mine[k]) for k in CHECKED_OPTIONS
                      if k in subset.meta and not _same(subset.meta[k], mine[k])}
            if differ:
                shown = ", ".join(f"{k}: file {a!r}, ColorFilter {b!r}" for k, (a, b) in differ.items())
                raise SelectionError(
                    f"The CoLoR-Filter subset file {str(self.subset_path)!r} was built with other options ({shown}). "
                    f"Delete it to rebuild it, point `subset_path` elsewhere, or pass ColorFilter(check_options=False) "
                    f"to train on it as it is.")
        if self._restored is not None and self._restored != (subset.num_samples, int(subset.kept.sum())):
            raise SelectionError(
                f"The restored ColorFilter trained on a subset of {self._restored[1]} of {self._restored[0]} samples, "
                f"but {str(self.subset_path)!r} keeps {int(subset.kept.sum())} of {subset.num_samples}; resume with "
                f"the same subset file.")
        loader = trainer.train_dataloader
        if trainer.world_size > 1 and not isinstance(getattr(loader, "sampler", None), DistributedSampler):
            raise SelectionError(
                "ColorFilter under DDP needs the training loader sharded by a DistributedSampler, or every rank "
                "trains the whole subset; keep Trainer(use_distributed_sampler=True) (the default).")

    # ---------------------------------------------------------------- the step
    def observe(self, ctx: StepContext) -> None:
        if ctx.phase != "train":
            return
        if self._kept is None or self._scores is None:
            raise SelectionError("ColorFilter was used before on_train_start; it must be a Trainer callback.")
        assert ctx.gathered is not None
        index = ctx.gathered["index"]
        kept, scores = self._kept, self._scores
        if kept.device != index.device:
            kept, scores = self._kept, self._scores = kept.to(index.device), scores.to(index.device)
        if index.numel() == 0:
            return
        inside = (index < kept.numel()) & kept[index.clamp(max=kept.numel() - 1)]
        if not bool(inside.all()):  # every rank sees the same gathered rows, so every rank raises here
            outside = index[~inside][:5].tolist()
            raise SelectionError(
                f"ColorFilter: step {ctx.trainer.global_step} trained samples outside the CoLoR-Filter subset "
                f"{str(self.subset_path)!r} (first: {outside}); the training loader does not draw from the file. Use "
                f"NoisyDigitsDataModule(sampler='subset_file', subset_path=...) (data.sampler=subset_file), or a "
                f"SubsetSampler(load_subset_file(path).indices) in your DataLoader.")
        trained = scores[index].double()
        self.steps += 1
        self.trained_rows += int(index.numel())
        self.score_sum = self.score_sum.to(trained.device) + trained.sum()
        if ctx.should_log:
            ctx.log("color/kept_share", float(kept.sum()) / kept.numel())
            ctx.log("color/score_mean", trained.mean().float())

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "trained_rows": self.trained_rows,
                                 "score_sum": self.score_sum.detach().cpu().clone()}
        if self._kept is not None:
            state["num_samples"], state["num_kept"] = int(self._kept.numel()), int(self._kept.sum())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.trained_rows = int(state_dict["steps"]), int(state_dict["trained_rows"])
        self.score_sum = torch.as_tensor(state_dict["score_sum"], dtype=torch.float64).clone()
        if "num_kept" in state_dict:
            self._restored = (int(state_dict["num_samples"]), int(state_dict["num_kept"]))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b
