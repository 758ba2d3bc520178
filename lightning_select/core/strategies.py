"""Strategies that run the selection engine from ``Strategy.training_step``.

This is the second way in (the first is simply adding policy callbacks to any stock strategy). The
names below are registered in Lightning's ``StrategyRegistry`` on ``import lightning_select`` (DDP
``popen`` children re-import the entry script, so registration must happen at import):

=========================== ============================================================
name                        strategy
=========================== ============================================================
``single_device_select``    :class:`SingleDeviceSelectStrategy` (CPU; pass ``device`` to pick)
``ddp_select``              :class:`DDPSelectStrategy`
``ddp_spawn_select``        :class:`DDPSelectStrategy` with ``start_method="spawn"``
``ddp_find_unused_select``  :class:`DDPSelectStrategy` with ``find_unused_parameters=True``
=========================== ============================================================

Policy settings live in the policy callbacks, never in the strategy (registry ``init_params`` are
fixed at registration). Both paths call :meth:`SelectionEngine.run_step`.

Example::

    >>> import lightning.pytorch as pl
    >>> import lightning_select
    >>> trainer = pl.Trainer(strategy="ddp_select", accelerator="cpu", devices=1, logger=False)
    >>> type(trainer.strategy).__name__
    'DDPSelectStrategy'
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_select.core.engine import SelectionEngine


class SelectStrategyMixin:
    """Routes ``training_step`` through the lightning_select engine when one is installed.

    ``runs_selection_engine`` tells the engine not to wrap ``training_step`` itself.
    """

    runs_selection_engine = True

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        parent = super()
        module = self.lightning_module  # type: ignore[attr-defined]
        engine = SelectionEngine.of(module)
        if engine is None:
            return parent.training_step(*args, **kwargs)  # type: ignore[misc]
        return engine.run_step(module, parent.training_step, *args, **kwargs)  # type: ignore[misc]


class SingleDeviceSelectStrategy(SelectStrategyMixin, SingleDeviceStrategy):
    """:class:`~lightning.pytorch.strategies.SingleDeviceStrategy` with the selection engine."""

    strategy_name = "single_device_select"


class DDPSelectStrategy(SelectStrategyMixin, DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` with the selection engine."""

    strategy_name = "ddp_select"


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register the ``*_select`` strategy names (idempotent)."""
    entries = {
        "single_device_select": (SingleDeviceSelectStrategy, {"device": "cpu"}),
        "ddp_select": (DDPSelectStrategy, {}),
        "ddp_spawn_select": (DDPSelectStrategy, {"start_method": "spawn"}),
        "ddp_find_unused_select": (DDPSelectStrategy, {"find_unused_parameters": True}),
    }
    for name, (cls, params) in entries.items():
        if name not in registry:
            registry.register(name, cls, description=f"{cls.__name__} ({params or 'defaults'})", **params)
