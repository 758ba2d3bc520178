"""Small models, datasets and test-only policies shared by the tests and the DDP scenario script."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_select import IndexedDataset, SelectionPolicy, StepContext


class RegressionTable(Dataset):
    """Deterministic regression data: x [8], y scalar."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, generator=g) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def regression_loader(n: int = 64, batch_size: int = 8, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(IndexedDataset(RegressionTable(n, seed)), batch_size=batch_size, shuffle=shuffle)


class PerSampleRegressor(pl.LightningModule):
    """Linear model; ``training_step`` returns per-sample MSE ``[B]`` (or a scalar / dict, per ``mode``)."""

    def __init__(self, mode: str = "per_sample", lr: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(8, 1))
        self.mode = mode
        self.lr = lr
        self.seen_batches: list[Tensor] = []

    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return (self.net(batch["x"]).squeeze(-1) - batch["y"]) ** 2

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        if torch.is_grad_enabled():
            self.seen_batches.append(batch["index"].clone())
        losses = self.per_sample_loss(batch)
        if self.mode == "scalar":
            return losses.mean()
        if self.mode == "dict":
            return {"loss": losses, "extra": losses.detach().sum()}
        return losses

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class KeepTopLoss(SelectionPolicy):
    """Test policy: keep the ``k`` highest scoring-pass losses (OHEM-like), needs the scoring pass."""

    needs_scores = True

    def __init__(self, k: int, scoring_mode: str = "eval") -> None:
        self.k = k
        self.scoring_mode = scoring_mode  # type: ignore[assignment]
        self.seen_scores: list[Tensor] = []

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        assert ctx.scores is not None
        self.seen_scores.append(ctx.scores.clone())
        return ctx.scores[ctx.rows].topk(min(self.k, ctx.rows.numel())).indices.sort().values


class KeepWhere(SelectionPolicy):
    """Test policy: keep rows whose sample index satisfies ``index % modulus in residues``."""

    def __init__(self, modulus: int, residues: tuple[int, ...], order: int = 100) -> None:
        self.modulus, self.residues, self.order = modulus, residues, order

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        idx = ctx.kept_indices % self.modulus
        return torch.isin(idx, torch.tensor(self.residues))


class IndexWeights(SelectionPolicy):
    """Test policy: weight ``1 + index % 3``."""

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        return 1.0 + (ctx.kept_indices % 3).float()


class QuadraticPenalty(SelectionPolicy):
    """Test policy: adds ``scale · Σ θ²`` over the module's parameters to the loss (a loss term)."""

    def __init__(self, scale: float = 0.3) -> None:
        self.scale = scale
        self.calls = 0

    def loss_terms(self, ctx: StepContext) -> Optional[Tensor]:
        self.calls += 1
        return self.scale * sum(p.square().sum() for p in ctx.module.parameters())


class RandomHalf(SelectionPolicy):
    """Test policy: keep a random half, drawn from the engine's position-seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.selected: list[Tensor] = []

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        perm = torch.randperm(ctx.rows.numel(), generator=ctx.generator(self.seed))
        keep = perm[: max(1, ctx.rows.numel() // 2)].sort().values
        self.selected.append(ctx.kept_indices[keep].clone())
        return keep


class Recorder(SelectionPolicy):
    """Test observer: records what each stage produced."""

    order = 950

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def observe(self, ctx: StepContext) -> None:
        self.records.append(
            {
                "indices": ctx.kept_indices.clone(),
                "losses": ctx.losses.detach().clone(),
                "weights": ctx.sample_weights.clone(),
                "has_samples": ctx.has_samples,
                "dtype": ctx.losses.dtype,
            }
        )


class ScoreRecorder(SelectionPolicy):
    """Test observer: per step, the scoring pass's losses and indices of the full batch, and the kept indices."""

    order = 960

    def __init__(self) -> None:
        self.steps: list[tuple[Tensor, Tensor, Tensor]] = []

    def observe(self, ctx: StepContext) -> None:
        assert ctx.scores is not None
        self.steps.append((ctx.scores.clone(), ctx.indices.clone(), ctx.kept_indices.clone()))


def grads_of(module: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in module.parameters()]


def expected_weighted_grad(model: nn.Module, x: Tensor, y: Tensor, w: Tensor) -> list[Tensor]:
    """Independent gradient of Σ w_i (f(x_i) − y_i)² / Σ w_i for a copy of ``model``'s net."""
    net = model.net
    for p in net.parameters():
        p.grad = None
    pred = net(x).squeeze(-1)
    loss = (w * (pred - y) ** 2).sum() / w.sum()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return [g.detach() for g in grads]


class GradCapture(pl.Callback):
    """Record the gradients seen just before every optimizer step."""

    def __init__(self) -> None:
        self.grads: list[list[Tensor]] = []
        self.batch_indices: list[Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batch_indices.append(batch["index"].clone())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])


def mse(pred: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(pred, y, reduction="none")


class CloseProcessGroup(pl.Callback):
    """Closes the process group at teardown. Spawned gloo workers can otherwise abort at interpreter
    exit ("terminate called without an active exception") while gloo threads are still alive."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class SignalAt(pl.Callback):
    """Sends a real signal to this process at the start of global step ``step`` (on ``rank`` only, if given)."""

    def __init__(self, step: int, signum: int = 15, rank: Optional[int] = None) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and (self.rank is None or trainer.global_rank == self.rank):
            import os

            os.kill(os.getpid(), self.signum)


class RankBatches(torch.utils.data.Sampler):
    """Per-rank batches of dataset positions (no DistributedSampler): lets one rank get another batch size."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LastCheckpointProbe(pl.Callback):
    """Records, at the start of every epoch after the first, whether ``checkpoints/last.ckpt`` exists yet."""

    seen: list = []

    def on_train_epoch_start(self, trainer, pl_module):
        import os

        if trainer.current_epoch > 0:
            path = os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt")
            LastCheckpointProbe.seen.append((trainer.current_epoch, os.path.exists(path)))


class ScalarRegression(pl.LightningModule):
    """Linear regression with a scalar mean loss (no engine) and an optional cosine schedule; records the
    accumulation in force at every optimizer step (``steps_seen``)."""

    def __init__(self, schedule=False):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.schedule = schedule
        self.steps_seen = []  # micro-batches per optimizer step, counted independently of the callback

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def on_before_optimizer_step(self, optimizer):
        self.steps_seen.append(self.trainer.accumulate_grad_batches)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def noisy_regression_loader(n=64, batch_size=8, noise=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    y = x @ torch.tensor([1.0, -1.0, 2.0, 0.5]) + noise * torch.randn(n, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def resumed_batches(make_loader, stop_after: int) -> tuple[list, list]:
    """``(full, seen + resumed)``: the batches of a fresh loader, and those of one interrupted after
    ``stop_after`` batches then resumed into a new loader from its ``state_dict`` (they must be equal)."""
    full = [b.tolist() for b in make_loader()]
    interrupted = make_loader()
    it = iter(interrupted)
    seen = [next(it).tolist() for _ in range(stop_after)]
    resumed = make_loader()
    resumed.load_state_dict(interrupted.state_dict())
    return full, seen + [b.tolist() for b in resumed]
