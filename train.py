"""Train with Hydra: ``python train.py``, ``python train.py +selector=loss_history``, ``trainer=ddp_cpu``.

See ``conf/`` for the config groups and README.md for examples.
"""

import hydra
from omegaconf import DictConfig

import lightning_select  # noqa: F401  (registers the *_select strategies before Hydra builds the trainer)
from lightning_select.cli import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric") or "heldout/precision@1", float("nan"))  # the sweep objective


if __name__ == "__main__":
    main()
