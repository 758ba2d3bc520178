"""Build and run a training job from a composed Hydra config (used by ``train.py``).

Example::

    >>> from hydra import compose, initialize_config_dir  # doctest: +SKIP
    >>> cfg = compose("train", overrides=["+selector=loss_history"])  # doctest: +SKIP
    >>> metrics = run(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_select.core import SelectionEngine, SelectionPolicy

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Engine, selector policies (``cfg.selector.<name>``) and plain callbacks, in that order."""
    callbacks: list[pl.Callback] = [instantiate(cfg.engine)]
    for name, node in (cfg.get("selector") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(
                f"selector.{name} must be a config with a `_target_` (got {node!r}); "
                "selector files nest their content under their own name, e.g. `gist: {_target_: ...}`."
            )
        policy = instantiate(node)
        if not isinstance(policy, SelectionPolicy):
            raise TypeError(f"selector.{name} built a {type(policy).__name__}, which is not a SelectionPolicy.")
        callbacks.append(policy)
    for node in (cfg.get("callbacks") or {}).values():
        if node is not None and "_target_" in node:
            callbacks.append(instantiate(node))
    if not isinstance(callbacks[0], SelectionEngine):
        raise TypeError("`engine` must build a lightning_select.SelectionEngine.")
    return callbacks


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build data/model/callbacks/loggers/trainer from ``cfg``, fit, and return final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = build_callbacks(cfg)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node and "_target_" in node]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    names = [type(c).__name__ for c in callbacks if isinstance(c, SelectionPolicy)]
    log.info("Selectors: %s", names or "none (plain in-batch training)")
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("heldout/")}
    if trainer.is_global_zero:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"[lightning_select] final held-out metrics: {summary}", flush=True)
    return metrics


