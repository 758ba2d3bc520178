"""Pre-emption: on SIGTERM (or SIGUSR1), save a resumable checkpoint on every rank together and stop.

Lightning 2.6's own SIGTERM handling broadcasts from inside the signal handler of the rank that got
the signal, so a signal to one DDP rank leaves every rank waiting forever (seen here: 13 minutes,
until SIGKILL). :class:`PreemptionCheckpoint` replaces those handlers for the duration of training.
Its handler only records the signal. At the end of each training batch every rank takes part in
one small all-reduce (``max`` of the signals seen), so all ranks agree to stop at the same step:
each writes the same checkpoint (``last.ckpt``, written by rank 0) and raises
:class:`TrainingPreempted`, a ``SystemExit`` with status ``128 + signal`` (143 for SIGTERM). Nothing
else runs after that: observers such as ``LossHistory`` export their tables from ``on_exception``.

Resume with ``Trainer.fit(..., ckpt_path=<that last.ckpt>)`` (``python train.py ... ckpt_path=last``):
with a :class:`~lightning_select.samplers.resumable.ResumableDataLoader` the resumed epoch skips
exactly the batches already trained, so the result equals an uninterrupted run.

SLURM: with hydra-submitit-launcher, SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit
and submitit's own handler requeues the job (resubmitting the same Hydra job, in the same output
folder). This callback handles SIGUSR2 like SIGTERM: every rank saves and stops, and only then is
submitit's handler called, so the requeue happens after the checkpoint exists. The requeued job
starts with ``ckpt_path=auto`` (the default of ``conf/train.yaml``) and resumes from it. Outside
submitit, Lightning's ``SLURMEnvironment(auto_requeue=True)`` owns its requeue signal (SIGUSR1):
this callback leaves that signal to Lightning.

Example::

    >>> cb = PreemptionCheckpoint(signals=("SIGTERM",))
    >>> cb.signals
    ('SIGTERM',)
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from lightning_select.core.engine import override


class TrainingPreempted(SystemExit):
    """Training stopped on a pre-emption signal after writing ``checkpoint``; exit status ``128 + signum``."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint

    def __str__(self) -> str:
        return (f"Training was pre-empted by {signal.Signals(self.signum).name}; a resumable checkpoint is at "
                f"{self.checkpoint}. Resume with ckpt_path pointing at it (train.py: ckpt_path=last).")


class PreemptionCheckpoint(Callback):
    """Save a resumable checkpoint and stop on every rank together when any rank gets a signal.

    Args:
        dirpath: folder of ``last.ckpt``; defaults to the ``ModelCheckpoint``'s ``dirpath``, else
            ``<default_root_dir>/checkpoints``.
        signals: signal names to handle (``SIGTERM``, ``SIGUSR1``, ``SIGUSR2``, ``SIGINT``).
        check_every_n_steps: agree on a stop every this many batches (one tiny all-reduce under DDP).
    """

    def __init__(self, dirpath: Optional[str] = None, signals: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
                 check_every_n_steps: int = 1) -> None:
        unknown = [s for s in signals if s not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")]
        if unknown:
            raise ValueError(f"Expected signal names among SIGTERM, SIGUSR1, SIGUSR2, SIGINT, but got {unknown}.")
        if not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"Expected `check_every_n_steps` to be an int >= 1, but got {check_every_n_steps!r}.")
        self.dirpath, self.signals, self.check_every_n_steps = dirpath, tuple(signals), check_every_n_steps
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum  # no I/O and no collective inside a signal handler

    def _install(self, trainer: "pl.Trainer") -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in ddp_spawn workers' threads)
        in_slurm = isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
        for name in self.signals:
            signum = int(getattr(signal, name))
            requeue = getattr(trainer._accelerator_connector.cluster_environment, "requeue_signal", None)
            if in_slurm and requeue is not None and signum == int(requeue):
                continue  # Lightning's SLURM auto-requeue owns this signal
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.received = None
        self._install(trainer)  # after Lightning registered its own handlers, so ours replace them

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore()

    # ------------------------------------------------------------------ the agreed stop
    def checkpoint_path(self, trainer: "pl.Trainer") -> Path:
        folder = self.dirpath
        if folder is None:
            ckpt = trainer.checkpoint_callback
            folder = ckpt.dirpath if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath else None
        if folder is None:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        return Path(folder) / "last.ckpt"

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.check_every_n_steps:
            return
        signum = self.received or 0
        if trainer.world_size > 1:  # every rank is here at the same step: agree on the largest signal seen
            signum = int(trainer.strategy.reduce(torch.tensor(float(signum), device=pl_module.device),
                                                 reduce_op="max"))
        if not signum:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"[lightning_select] {signal.Signals(signum).name}: saved a resumable checkpoint to {path}")
        self._chain(signum)
        raise TrainingPreempted(signum, path)

    def _chain(self, signum: int) -> None:
        """Call the handler ours replaced (e.g. submitit's requeue), unless it is Lightning's own."""
        previous = self._previous.get(signum)
        if not callable(previous) or type(previous).__module__.startswith("lightning"):
            return
        if getattr(previous, "__module__", "").startswith("lightning"):
            return
        try:
            previous(signum, None)
        except SystemExit:  # submitit exits after requeueing; we exit with our own status below
            pass
