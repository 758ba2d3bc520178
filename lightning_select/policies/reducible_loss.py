"""``ReducibleLossSelection`` (RHO-LOSS): train on the top fraction of a larger loaded batch by
reducible loss, and the irreducible-loss (IL) table it reads.

The IL table is a ``torch.save`` file ``{"irreducible_loss": [N] float32, "targets": [N] int64,
"meta": {...}}`` keyed by sample index. :func:`build_irreducible_table` trains an IL model on a holdout
split; :func:`build_irreducible_table_two_halves` needs no holdout (two IL models on the two halves of
the training set, each scoring the other half). :func:`load_irreducible_table` checks a table against
the training set's targets.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.batch import get_indices
from lightning_select.core.context import training_loss_of
from lightning_select.core.distributed import all_gather_rows, build_on_rank_zero, raise_together, valid_rows
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option, int_option, path_option, real_option, str_option
from lightning_select.io import read_index_table, scatter_by_index, write_index_table
from lightning_select.rules.reducible_loss import global_top_fraction, reducible_loss, threshold_of, top_fraction

PathLike = Union[str, "os.PathLike[str]"]
BUILD_HINT = ("rebuild it with `lightning_select.policies.reducible_loss.build_irreducible_table(model_factory, "
              "datamodule.holdout_dataloader(shuffle=True), datamodule.scoring_dataloader(), epochs, path)` "
              "(or delete the file and let ReducibleLossSelection(build_if_missing=True) rebuild it; "
              "`python train.py experiment=rho_digits` does this for noisy digits)")


def _per_sample_loss(module: nn.Module, batch: Any, batch_idx: int) -> Tensor:
    losses = training_loss_of(module.training_step(batch, batch_idx))  # type: ignore[operator]
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        raise SelectionError(f"The irreducible-loss model's training_step must return [B] per-sample losses (or "
                             f"{{'loss': [B], ...}}), but returned {type(losses).__name__}.")
    return losses.float()


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def _private_rng() -> Any:
    """Fork the global RNGs (CPU and CUDA), so that building a table never moves the training run's RNG state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def train_il_model(model: nn.Module, loader: Iterable, epochs: int, lr: float = 1e-3, weight_decay: float = 1e-2,
                   seed: int = 0, progress: bool = True, desc: str = "IL model") -> nn.Module:
    """Train ``model`` with a plain PyTorch loop: AdamW on the mean of its ``training_step`` per-sample loss.

    Seeds the global RNG with ``seed``; the builders call it inside a forked RNG state."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        for i, batch in enumerate(loader):
            loss = _per_sample_loss(model, _move(batch, device), i).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def score_samples(model: nn.Module, loader: Iterable, target_key: str = "label",
                  index_key: Union[str, int] = "index") -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, losses, targets)`` of every sample of ``loader``, with ``model`` in eval mode (no augmentation
    randomness such as dropout) and no grad."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    for i, batch in enumerate(loader):
        if not isinstance(batch, dict) or target_key not in batch:
            raise SelectionError(f"Scoring the irreducible losses needs dict batches with the targets under "
                                 f"{target_key!r}.")
        losses = _per_sample_loss(model, _move(batch, device), i)
        out.append((get_indices(batch, index_key).cpu(), losses.cpu(), batch[target_key].long().cpu()))
    model.train(was_training)
    return tuple(torch.cat(parts) for parts in zip(*out))  # type: ignore[return-value]


def _write_table(path: PathLike, n: int, indices: Tensor, losses: Tensor, targets: Tensor, meta: dict) -> Path:
    columns = scatter_by_index(n, indices, {"irreducible_loss": losses.float(), "targets": targets.long()})
    missing = int(torch.isnan(columns["irreducible_loss"]).sum())  # a NaN loss counts as not scored
    if missing:
        raise SelectionError(f"The scoring loader missed {missing} of {n} training samples; it must cover all of them.")
    return write_index_table(path, columns, meta)  # atomic: a concurrent reader never sees a partial table


def build_irreducible_table(model_factory: Callable[[], nn.Module], train_loader: Iterable, score_loader: DataLoader,
                            epochs: int, path: PathLike, lr: float = 1e-3, weight_decay: float = 1e-2,
                            seed: int = 0, target_key: str = "label", index_key: Union[str, int] = "index",
                            progress: bool = True) -> Path:
    """Train a fresh IL model on ``train_loader`` (the holdout split), score the training set
    (``score_loader``, in index order, augmentation off) and write the table to ``path``.

    The model comes from ``model_factory()`` (seeded with ``seed``); its own ``training_step``
    gives the per-sample losses, so the IL and the training loss are the same function.
    """
    with _private_rng():
        torch.manual_seed(seed)
        model = model_factory()
        train_il_model(model, train_loader, epochs, lr, weight_decay, seed, progress, "IL model (holdout)")
        indices, losses, targets = score_samples(model, score_loader, target_key, index_key)
    n = len(score_loader.dataset)  # type: ignore[arg-type]
    meta = {"source": "holdout", "epochs": epochs, "lr": lr, "seed": seed}
    return _write_table(path, n, indices, losses, targets, meta)


def build_irreducible_table_two_halves(model_factory: Callable[[], nn.Module], train_set: Dataset, epochs: int,
                                       path: PathLike, batch_size: int = 64, split: Literal["parity", "permutation"] = "parity",
                                       lr: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0,
                                       target_key: str = "label", index_key: Union[str, int] = "index",
                                       progress: bool = True) -> Path:
    """The no-holdout variant: two IL models, each trained on one half of ``train_set`` (split by
    sample-index parity, or by a ``seed``-ed permutation) and scoring the other half."""
    n = len(train_set)  # type: ignore[arg-type]
    if split == "parity":
        halves = [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    elif split == "permutation":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        halves = [perm[: n // 2].sort().values, perm[n // 2:].sort().values]
    else:
        raise ValueError(f"Expected `split` to be 'parity' or 'permutation', but got {split!r}.")
    parts = []
    for h, (train_half, score_half) in enumerate([(halves[0], halves[1]), (halves[1], halves[0])]):
        with _private_rng():
            torch.manual_seed(seed + h)
            model = model_factory()
            loader = DataLoader(Subset(train_set, train_half.tolist()), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed + h))
            train_il_model(model, loader, epochs, lr, weight_decay, seed + h, progress, f"IL model (half {h})")
            parts.append(score_samples(model, DataLoader(Subset(train_set, score_half.tolist()), batch_size=512),
                                       target_key, index_key))
    indices, losses, targets = (torch.cat(p) for p in zip(*parts))
    meta = {"source": f"two_halves/{split}", "epochs": epochs, "lr": lr, "seed": seed}
    return _write_table(path, n, indices, losses, targets, meta)


def load_irreducible_table(path: PathLike, targets: Optional[Tensor] = None) -> tuple[Tensor, Tensor, dict]:
    """``(irreducible_loss [N] float32, targets [N] int64, meta)`` from ``path``, checked against ``targets``.

    Raises :class:`SelectionError` naming the file, the mismatch and the fix when the table does not
    belong to this training set (another length, or other targets at some indices).
    """
    columns, meta = read_index_table(path, ("irreducible_loss", "targets"), targets, "irreducible-loss table",
                                     BUILD_HINT)
    return columns["irreducible_loss"].float(), columns["targets"].long(), meta


def fresh_copy_factory(pl_module: Any, device: Any = None) -> Callable[[], nn.Module]:
    """A factory of fresh instances of ``pl_module``'s class (built from its hparams) with a copy of its
    *current* weights, on ``device`` (default: the module's): the offline models of RHO-LOSS and
    CoLoR-Filter, with the same architecture and initial weights as the trained model."""
    initial = copy.deepcopy(pl_module.state_dict())

    def make() -> nn.Module:
        model = type(pl_module)(**dict(pl_module.hparams))
        model.load_state_dict(initial)
        return model.to(pl_module.device if device is None else device)
    return make


def training_targets(trainer: Any, target_key: str, index_key: Union[str, int] = "index",
                     owner: str = "ReducibleLossSelection") -> Tensor:
    """``[N]`` targets of the training set by sample index: from ``trainer.datamodule.scoring_dataloader()``
    when it has one, else by reading every item of the training dataset. ``owner`` names the caller in errors."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "scoring_dataloader"):
        loader: Iterable = datamodule.scoring_dataloader()
        n = len(loader.dataset)  # type: ignore[attr-defined]
    else:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None:
            raise SelectionError(f"{owner} needs the training dataset to check the table's targets.")
        n, loader = len(dataset), ({k: [v] if not isinstance(v, Tensor) else v.unsqueeze(0)
                                     for k, v in item.items()} for item in dataset)
    out = torch.full((n,), -1, dtype=torch.int64)
    for batch in loader:
        if not isinstance(batch, dict) or target_key not in batch:
            raise SelectionError(f"{owner}(target_key={target_key!r}): the training batches hold no "
                                 f"such key; set `target_key` to the class-target key.")
        out[get_indices(batch, index_key).cpu()] = torch.as_tensor(batch[target_key]).long().cpu()
    return out


class ReducibleLossSelection(SelectionPolicy):
    """RHO-LOSS: train on the samples with the highest reducible loss (Mindermann et al., 2022).

    **Card.** What it changes: the selection (the deterministic top ``⌈keep·B⌉`` of each loaded batch
    by ``loss − IL[index]``). Unbiased: no, by design; the kept rows are trained with a plain mean
    (no weights), which is the paper's rule. Extra cost: one no-grad scoring forward over the ``B``
    loaded rows; the IL table (4 + 8 bytes per sample) on the device; once, the IL model's training
    and one scoring pass over the training set (when the table is built); with ``scope="global"``
    two all-gathers per step (the per-rank row counts and the ``[B]`` reducible losses). Reference:
    "Prioritized Training on Points that are Learnable, Worth Learning, and Not Yet Learnt",
    ICML 2022 (github.com/OATML/RHO-Loss). Defaults: ``keep=0.1`` (``n_b/n_B = 32/320``), the IL
    model trained on a holdout split, the scoring pass in eval mode.

    **The IL table** (``table_path``) is loaded at ``on_train_start`` and checked against the training
    set's targets (read once from ``trainer.datamodule.scoring_dataloader()`` when available, else
    from the training dataset's items); every rank runs the same check, so they raise together. If
    the file is missing and ``build_if_missing``, it is built from ``trainer.datamodule.holdout_dataloader()``
    with an IL model that is a *fresh instance of the module's class built from its hparams with a
    deep copy of the module's weights at the start of training* (so it has the same architecture and
    the same initial weights), trained for ``il_epochs`` with AdamW (a plain loop); rank 0 builds and
    writes it, the others wait. In one process each step also checks that the batch's targets equal
    the table's (one cheap comparison); under DDP the start check is the guard.

    Load the larger batch in the DataLoader (``B = n_b / keep``, e.g. ``data.batch_size=320``).
    Under DDP, ``scope="rank"`` keeps the top fraction of each rank's batch; ``scope="global"`` keeps
    each rank's share of the global top ``⌈keep·W·B⌉`` (ranks may then train different counts, which
    the engine's global normalisation handles).

    Logs ``rho/kept_fraction``, ``rho/reducible_mean``, ``rho/irreducible_mean``, ``rho/threshold``.

    Args:
        table_path: the IL table file.
        keep: the trained fraction of the loaded batch, in (0, 1].
        target_key: batch key of the class targets (checked against the table).
        scope: ``"rank"`` or ``"global"`` (see above).
        scoring_mode: ``"eval"`` or ``"train"`` mode of the scoring pass.
        build_if_missing: build the table from the datamodule's holdout split when the file is missing.
        il_epochs: epochs of the IL model (when building).
        il_lr: AdamW learning rate of the IL model; None: the module's ``hparams.lr`` or 1e-3.
        il_batch_size: batch size of the holdout loader (when building).
        seed: seed of the IL model's training.
        progress: tqdm bars while building.

    Example::

        >>> policy = ReducibleLossSelection("outputs/il_tables/digits.pt", keep=0.1)
        >>> policy.needs_scores, policy.normalise_by_count
        (True, False)
        >>> # Trainer(callbacks=[policy]).fit(NoisyLabelClassifier(), NoisyDigitsDataModule(batch_size=320))
    """

    order = 200
    needs_scores = True
    loads_larger_batch = True

    def __init__(self, table_path: PathLike, keep: float = 0.1, target_key: str = "label",
                 scope: Literal["rank", "global"] = "rank", scoring_mode: Literal["eval", "train"] = "eval",
                 build_if_missing: bool = True, il_epochs: int = 20, il_lr: Optional[float] = None,
                 il_batch_size: int = 64, seed: int = 0, progress: bool = True) -> None:
        who = type(self).__name__
        self.table_path = path_option(who, "table_path", table_path, optional=False)
        keep = real_option(who, "keep", keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{who}: expected `keep` in (0, 1], but got {keep}; e.g. keep=0.1 trains 32 of 320.")
        if scope not in ("rank", "global"):
            raise ValueError(f"{who}: expected `scope` to be 'rank' or 'global', but got {scope!r}.")
        if scoring_mode not in ("eval", "train"):
            raise ValueError(f"{who}: expected `scoring_mode` to be 'eval' or 'train', but got {scoring_mode!r}.")
        self.keep, self.scope, self.scoring_mode = keep, scope, scoring_mode
        self.target_key = str_option(who, "target_key", target_key)
        self.build_if_missing = bool_option(who, "build_if_missing", build_if_missing)
        self.il_epochs = int_option(who, "il_epochs", il_epochs, minimum=1)
        self.il_lr = real_option(who, "il_lr", il_lr, optional=True)
        if self.il_lr is not None and self.il_lr <= 0:
            raise ValueError(f"{who}: expected a positive `il_lr`, but got {self.il_lr}.")
        self.il_batch_size = int_option(who, "il_batch_size", il_batch_size, minimum=1)
        self.seed = int_option(who, "seed", seed)
        self.progress = bool_option(who, "progress", progress)
        self.irreducible: Optional[Tensor] = None
        self.table_targets: Optional[Tensor] = None
        self.meta: dict = {}
        self.steps, self.kept_rows = 0, 0

    # ---------------------------------------------------------------- the table
    def _model_factory(self, pl_module: Any) -> Callable[[], nn.Module]:
        return fresh_copy_factory(pl_module)

    def build_table(self, trainer: Any, pl_module: Any) -> None:
        """Build the table from ``trainer.datamodule.holdout_dataloader()`` (see the class docstring)."""
        datamodule = getattr(trainer, "datamodule", None)
        holdout = getattr(datamodule, "holdout_set", None)
        if datamodule is None or not hasattr(datamodule, "holdout_dataloader") \
                or not hasattr(datamodule, "scoring_dataloader") or (holdout is not None and len(holdout) == 0):
            raise SelectionError(
                f"ReducibleLossSelection: no irreducible-loss table at {self.table_path!r}, and the datamodule "
                f"({type(datamodule).__name__}) has no holdout split to build one (it needs holdout_dataloader() and "
                "scoring_dataloader()). Build it first with build_irreducible_table(...) on a holdout loader, or "
                "build_irreducible_table_two_halves(...) without one, e.g. for noisy digits "
                "`python train.py experiment=rho_digits` builds outputs/il_tables/digits_noisy_seed0.pt.")
        lr = self.il_lr or float(getattr(pl_module, "hparams", {}).get("lr", 1e-3))
        index_key = getattr(datamodule, "index_key", "index")
        build_irreducible_table(self._model_factory(pl_module),
                                datamodule.holdout_dataloader(batch_size=self.il_batch_size, shuffle=True),
                                datamodule.scoring_dataloader(), self.il_epochs, self.table_path, lr=lr,
                                seed=self.seed, target_key=self.target_key, index_key=index_key,
                                progress=self.progress)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not Path(self.table_path).is_file():
            if not self.build_if_missing:
                raise SelectionError(f"ReducibleLossSelection: no irreducible-loss table at {self.table_path!r} "
                                     f"(build_if_missing=False); {BUILD_HINT}.")
            build_on_rank_zero(trainer, lambda: self.build_table(trainer, pl_module),
                               "ReducibleLossSelection could not build the irreducible-loss table.", "rho_loss_table")
        index_key = getattr(getattr(trainer, "datamodule", None), "index_key", "index")
        problem = None
        try:
            targets = training_targets(trainer, self.target_key, index_key)
            il, stored, self.meta = load_irreducible_table(self.table_path, targets)
        except SelectionError as err:
            problem = str(err)
        raise_together(trainer, problem, "ReducibleLossSelection: the irreducible-loss table cannot be used.")
        self.irreducible, self.table_targets = il.to(pl_module.device), stored.to(pl_module.device)

    # ---------------------------------------------------------------- the step
    def select(self, ctx: StepContext) -> Tensor:
        if self.irreducible is None or self.table_targets is None:
            raise SelectionError("ReducibleLossSelection was used before on_train_start; it must be a Trainer callback.")
        assert ctx.scores is not None
        rows, indices = ctx.rows, ctx.kept_indices
        device = ctx.scores.device
        if int(indices.max()) >= self.irreducible.numel():
            raise SelectionError(f"Sample index {int(indices.max())} is outside the irreducible-loss table of "
                                 f"{self.irreducible.numel()} samples ({self.table_path!r}); {BUILD_HINT}.")
        il = self.irreducible.to(device)[indices.to(device)]
        if ctx.world_size == 1 and isinstance(ctx.batch, dict) and isinstance(ctx.batch.get(self.target_key), Tensor):
            targets = ctx.batch[self.target_key].to(device)[rows.to(device)]
            if bool((targets != self.table_targets.to(device)[indices.to(device)]).any()):
                raise SelectionError(f"Batch {ctx.batch_idx}: the targets differ from those stored in the "
                                     f"irreducible-loss table {self.table_path!r}; {BUILD_HINT}.")
        reducible = reducible_loss(ctx.scores[rows.to(device)], il)
        if self.scope == "global" and ctx.world_size > 1:
            gathered, counts = all_gather_rows(ctx, reducible, fill=float("-inf"))
            positions = global_top_fraction(reducible, gathered, ctx.trainer.global_rank, self.keep, counts)
            threshold = threshold_of(valid_rows(gathered, counts), self.keep)  # the same on every rank
        else:
            positions = top_fraction(reducible, self.keep)
            threshold = float(reducible[positions].min()) if positions.numel() else float("nan")
        self.steps += 1
        self.kept_rows += int(positions.numel())
        ctx.log("rho/kept_fraction", positions.numel() / max(rows.numel(), 1))
        ctx.log("rho/reducible_mean", reducible.mean())
        ctx.log("rho/irreducible_mean", il.mean())
        ctx.log("rho/threshold", threshold)
        return positions.to(rows.device)

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "kept_rows": self.kept_rows}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.kept_rows = int(state_dict["steps"]), int(state_dict["kept_rows"])
