"""Build and run a training job from a composed Hydra config (used by ``train.py``).

Example::

    >>> from hydra import compose, initialize_config_dir  # doctest: +SKIP
    >>> cfg = compose("train", overrides=["+selector=loss_history"])  # doctest: +SKIP
    >>> metrics = run(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_select.core import SelectionEngine, SelectionPolicy, TrainingPreempted

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Engine, selector callbacks (``cfg.selector.<name>``: policies, or callbacks such as
    :class:`~lightning_select.AdaptiveBatchSize`) and plain callbacks, in that order."""
    callbacks: list[pl.Callback] = [instantiate(cfg.engine)]
    for name, node in (cfg.get("selector") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(
                f"selector.{name} must be a config with a `_target_` (got {node!r}); "
                "selector files nest their content under their own name, e.g. `gist: {_target_: ...}`."
            )
        policy = instantiate(node)
        if not isinstance(policy, pl.Callback):  # a SelectionPolicy, or a step-level callback (AdaptiveBatchSize)
            raise TypeError(f"selector.{name} built a {type(policy).__name__}, which is not a Lightning Callback.")
        callbacks.append(policy)
    for node in (cfg.get("callbacks") or {}).values():
        if node is not None and "_target_" in node:
            callbacks.append(instantiate(node))
    if not isinstance(callbacks[0], SelectionEngine):
        raise TypeError("`engine` must build a lightning_select.SelectionEngine.")
    return callbacks


def resolve_ckpt_path(value: Optional[str], output_dir: Union[str, Path], task_dir: Union[str, Path]) -> Optional[str]:
    """The checkpoint to resume from for ``ckpt_path=value``.

    ``None``: start fresh. ``"auto"``: this run folder's ``checkpoints/last.ckpt`` if it exists (a
    requeued or re-launched job), else start fresh. ``"last"``: the same file, or if this run folder
    has none, the newest ``last.ckpt`` under ``task_dir`` (earlier runs of this task); an error if
    there is none. Anything else is a path that must exist.

    Example::

        >>> resolve_ckpt_path("auto", "/nonexistent/run", "/nonexistent") is None
        True
    """
    if value in (None, "", "null", "none"):
        return None
    own = Path(output_dir) / "checkpoints" / "last.ckpt"
    if value == "auto":
        return str(own) if own.is_file() else None
    if value == "last":
        if own.is_file():
            return str(own)
        found = sorted(Path(task_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last found no checkpoints/last.ckpt in this run folder ({output_dir}) nor under {task_dir}. "
                "Pass the checkpoint's path, or hydra.run.dir=<the interrupted run's folder> ckpt_path=last, or drop "
                "ckpt_path to start fresh."
            )
        return str(found[-1])
    if not Path(value).is_file():
        raise FileNotFoundError(f"ckpt_path={value!r} does not exist. Use ckpt_path=last to find the latest checkpoint.")
    return str(value)


def _resolved(cfg: DictConfig) -> dict:
    """The config as a plain dict, interpolations resolved where they can be (as written otherwise)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001  (e.g. a ${hydra:...} interpolation outside a Hydra run)
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _report(line: str) -> None:
    """Print on stdout and append to the run's log file (the root logger's file handlers, set up by Hydra)."""
    print(line, flush=True)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build data/model/callbacks/loggers/trainer from ``cfg``, fit, and return final metrics."""
    if cfg.trainer.get("max_epochs") == 0:
        raise ValueError("trainer.max_epochs=0 trains nothing; set trainer.max_epochs to 1 or more.")
    output_dir = Path(cfg.paths.get("output_dir") or ".")
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, Path("outputs") / str(cfg.task_name))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = build_callbacks(cfg)
    for callback in callbacks:  # exporters that record the run's configuration (TrainingDynamics' metadata)
        if hasattr(callback, "run_config"):
            callback.run_config = _resolved(cfg)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node and "_target_" in node]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    names = [type(c).__name__ for c in callbacks
             if isinstance(c, SelectionPolicy) or type(c).__module__.startswith("lightning_select.policies")]
    log.info("Selectors: %s", names or "none (plain in-batch training)")
    if ckpt_path and trainer.is_global_zero:
        _report(f"[lightning_select] resuming from {ckpt_path}")
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingPreempted as stop:
        if trainer.is_global_zero:
            _report(f"[lightning_select] {stop}")
            _report_outputs(output_dir, callbacks)
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("heldout/")}
    if trainer.is_global_zero:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())) or "none (no validation ran)"
        _report(f"[lightning_select] final held-out metrics: {summary}")
        _report_outputs(output_dir, callbacks)
    return metrics


def _report_outputs(output_dir: Path, callbacks: list[pl.Callback]) -> None:
    exports = [str(getattr(c, "export_path", None) or getattr(c, "flagged_pairs_path", None)) for c in callbacks
               if getattr(c, "export_path", None) or getattr(c, "flagged_pairs_path", None)]
    _report(f"[lightning_select] outputs: run folder {output_dir}; checkpoints {output_dir / 'checkpoints'}; "
            f"exports {exports or 'none'}; log {output_dir / 'train.log'}")
