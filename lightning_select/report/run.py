"""Read one run directory for the report and check that its files describe one dataset.

A run directory is a training run's ``paths.output_dir``. Every file is optional except that at least one
per-sample history must be there:

==================================== ===========================================================
file                                 what the report reads from it
==================================== ===========================================================
``training_dynamics.parquet``/.csv   per-sample cartography, forgetting, AUM, EL2N (+ ``label``, ``noisy``)
``training_dynamics.json``           its metadata: ``num_samples``, epochs, seed, unavailable statistics
``training_dynamics_trace.npy``      ``[N, E]`` per-epoch p(true label)
``loss_history.parquet``/.csv/.npz   ``LossHistory`` export: EMA loss, counts, ``loss_epoch_*`` traces
``dbpm.parquet`` + ``dbpm.json``     DBPM's per-pair mean loss, flag (0 ok, 1 noisy, 2 faulty), weight
``flagged_pairs.parquet``/.csv       GIST's flagged (anchor, candidate) pairs
``csv/version_*/metrics.csv``        the CSV logger's metrics (all versions, in order: resumed runs)
``.hydra/config.yaml``               the composed config: run facts, and the dataset for the texts
==================================== ===========================================================

Example::

    >>> import tempfile
    >>> load_run(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_select.report.run.ReportError: The run directory ... holds no per-sample history...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

HISTORY, DYNAMICS, DBPM, PAIRS = "loss_history", "training_dynamics", "dbpm", "flagged_pairs"
TRACE_FILE = "training_dynamics_trace.npy"
CONFIG_FILE = Path(".hydra") / "config.yaml"


class ReportError(ValueError):
    """A run directory the report cannot describe; the message names the file, the problem and the fix."""


@dataclass
class RunData:
    """Everything the report found in one run directory (``None`` where a file is absent)."""

    run_dir: Path
    num_samples: int
    history: Any = None  # pandas.DataFrame, one row per sample index
    dynamics: Any = None
    dynamics_meta: dict = field(default_factory=dict)
    trace: Optional[np.ndarray] = None  # [N, E] p(true label) per epoch
    trace_epochs: list[int] = field(default_factory=list)  # the epoch of each trace column
    dbpm: Any = None
    dbpm_meta: dict = field(default_factory=dict)
    pairs: Any = None
    metrics: Any = None  # pandas.DataFrame of every metrics.csv row
    config: Any = None  # omegaconf.DictConfig
    dataset: Any = None  # the run's training set (items by sample index), when it could be loaded
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the report could not do, and why


def _find(run_dir: Path, stem: str, suffixes: tuple[str, ...] = (".parquet", ".csv")) -> Optional[Path]:
    return next((run_dir / f"{stem}{s}" for s in suffixes if (run_dir / f"{stem}{s}").is_file()), None)


def read_table(path: Union[str, Path]) -> Any:
    """A ``.parquet``, ``.csv`` or ``.npz`` table as a pandas DataFrame (a clear error when unreadable)."""
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return pd.DataFrame({k: data[k] for k in data.files})
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as err:  # pyarrow, pandas and numpy raise many types for a damaged file
        raise ReportError(f"Could not read {path.name} ({type(err).__name__}: {err}); the file is damaged or "
                          "not a table. Re-export it from the run's checkpoint, or remove it.") from err


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise ReportError(f"{path.name} is not valid JSON ({err}); re-export the run's metadata or remove the file.")
    if not isinstance(meta, dict):
        raise ReportError(f"{path.name} holds a {type(meta).__name__}, expected a JSON object of run metadata.")
    return meta


def read_metrics(run_dir: Union[str, Path]) -> Any:
    """Every ``csv/version_*/metrics.csv`` row, versions in numeric order (a resumed run adds a version)."""
    import pandas as pd

    found = [p for p in Path(run_dir).glob("*/version_*/metrics.csv")]
    found.sort(key=lambda p: (p.parent.parent.name, int(re.sub(r"\D", "", p.parent.name) or 0)))
    frames = [pd.read_csv(p) for p in found if p.stat().st_size]
    return pd.concat(frames, ignore_index=True) if frames else None


def _by_index(frame: Any, name: str) -> Any:
    """The table sorted by its ``index`` column, which must be exactly ``0 .. N-1``."""
    if "index" not in frame.columns:
        return frame.reset_index(drop=True)
    frame = frame.sort_values("index", kind="stable").reset_index(drop=True)
    if not np.array_equal(frame["index"].to_numpy(), np.arange(len(frame))):
        raise ReportError(f"{name} is damaged: its `index` column is not every sample index 0..{len(frame) - 1} "
                          "once. Re-export the table from the run.")
    return frame


def _agree_on_size(sizes: dict[str, int]) -> int:
    """The one dataset size that every file states, or a :class:`ReportError` listing them."""
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise ReportError(f"The run's files disagree on the dataset size ({listed}): a history from a different "
                          "dataset size was mixed into this directory. Keep only the files that one run wrote.")
    return next(iter(sizes.values()))


def load_run(run_dir: Union[str, Path], data_dir: Optional[str] = None, load_data: bool = True) -> RunData:
    """Read and cross-check a run directory (see the module docstring).

    Args:
        run_dir: the run's output directory.
        data_dir: overrides the config's ``paths.data_dir`` when the dataset is loaded.
        load_data: instantiate the run's datamodule from ``.hydra/config.yaml`` (to check the dataset
            size and to show texts); ``False`` skips it.

    Raises:
        ReportError: the directory does not exist, holds neither ``training_dynamics`` nor
            ``loss_history``, or its files (or the config's dataset) disagree on the number of samples.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"The run directory {str(run_dir)!r} does not exist. Pass the output folder of a training "
                          "run (its paths.output_dir, e.g. outputs/train/runs/<date>).")
    if not run_dir.is_dir():
        raise ReportError(f"{str(run_dir)!r} is a file, not a run directory. Pass the folder that holds "
                          "loss_history.parquet or training_dynamics.parquet.")
    history_path = _find(run_dir, HISTORY, (".parquet", ".csv", ".npz"))
    dynamics_path = _find(run_dir, DYNAMICS)
    if history_path is None and dynamics_path is None:
        present = sorted(p.name for p in run_dir.iterdir())[:12]
        raise ReportError(
            f"The run directory {str(run_dir)!r} holds no per-sample history: neither {DYNAMICS}.parquet nor "
            f"{HISTORY}.parquet (it holds {present or 'nothing'}). Train with `+selector=loss_history` (or the "
            "TrainingDynamics observer) and point the report at that run's output folder.")
    run = RunData(run_dir=run_dir, num_samples=0)
    sizes: dict[str, int] = {}
    if history_path is not None:
        run.history = _by_index(read_table(history_path), history_path.name)
        sizes[history_path.name] = len(run.history)
    if dynamics_path is not None:
        from lightning_select.stats.dynamics_files import load_dynamics

        _read_json(run_dir / f"{DYNAMICS}.json")  # a clear error for damaged metadata
        try:
            run.dynamics, run.dynamics_meta = load_dynamics(run_dir)
        except ValueError as err:  # the table disagrees with its metadata, or its index is damaged
            raise ReportError(f"{err} Keep only the files that one run wrote.") from err
        except Exception as err:  # an unreadable table
            raise ReportError(f"Could not read {dynamics_path.name} ({type(err).__name__}: {err}); re-export it "
                              "or remove it.") from err
        sizes[dynamics_path.name] = len(run.dynamics)
    trace_path = run_dir / str(run.dynamics_meta.get("trace_file") or TRACE_FILE)
    if trace_path.is_file():
        run.trace = np.load(trace_path, mmap_mode="r", allow_pickle=False)
        if run.trace.ndim != 2:
            raise ReportError(f"{trace_path.name} has shape {run.trace.shape}; expected [samples, epochs]. "
                              "Re-export it.")
        sizes[f"{trace_path.name} rows"] = run.trace.shape[0]
        epochs = run.dynamics_meta.get("trace_epochs")
        run.trace_epochs = [int(e) for e in epochs] if isinstance(epochs, list) and len(epochs) == run.trace.shape[1] \
            else list(range(run.trace.shape[1]))
    dbpm_path = _find(run_dir, DBPM)
    if dbpm_path is not None:
        run.dbpm = _by_index(read_table(dbpm_path), dbpm_path.name)
        sizes[dbpm_path.name] = len(run.dbpm)
        run.dbpm_meta = _read_json(run_dir / f"{DBPM}.json")
        if "num_samples" in run.dbpm_meta:
            sizes[f"{DBPM}.json num_samples"] = int(run.dbpm_meta["num_samples"])
    run.num_samples = _agree_on_size(sizes)
    pairs_path = _find(run_dir, PAIRS)
    if pairs_path is not None:
        run.pairs = read_table(pairs_path)
        _check_pairs(run.pairs, run.num_samples, pairs_path.name)
    run.metrics = read_metrics(run_dir)
    if (run_dir / CONFIG_FILE).is_file():
        from omegaconf import OmegaConf

        run.config = OmegaConf.load(run_dir / CONFIG_FILE)
    elif isinstance(run.dynamics_meta.get("config"), dict):
        from omegaconf import OmegaConf

        run.config = OmegaConf.create(run.dynamics_meta["config"])
    else:
        run.notes.append("No .hydra/config.yaml: the run's policies and dataset are unknown (texts are not shown).")
    run.files = sorted(str(p.relative_to(run_dir)) for p in [history_path, dynamics_path, dbpm_path, pairs_path]
                       if p is not None)
    run.files += [name for name in (trace_path.name, f"{DYNAMICS}.json", f"{DBPM}.json", str(CONFIG_FILE))
                  if (run_dir / name).is_file()]
    if run.metrics is not None:
        run.files.append("csv/version_*/metrics.csv")
    if load_data and run.config is not None and run.config.get("data") is not None:
        run.dataset = _load_dataset(run, data_dir)
    return run


def _check_pairs(pairs: Any, n: int, name: str) -> None:
    missing = {"anchor_index", "candidate_index"} - set(pairs.columns)
    if missing:
        raise ReportError(f"{name} lacks the columns {sorted(missing)}; it is not a GIST flagged-pair export.")
    if len(pairs):
        low = int(min(pairs["anchor_index"].min(), pairs["candidate_index"].min()))
        high = int(max(pairs["anchor_index"].max(), pairs["candidate_index"].max()))
        if low < 0 or high >= n:
            raise ReportError(f"{name} names sample {high if high >= n else low}, outside the history's {n} samples: "
                              "the pairs come from a different dataset size. Keep the files of one run together.")


def _resolved_data_config(run: RunData, data_dir: Optional[str]) -> Any:
    """The config's ``data`` node, resolved outside Hydra: ``paths.output_dir`` is the run directory and a
    relative ``paths.data_dir`` that does not exist here is tried against the run's original working dir."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(run.config, resolve=False))
    OmegaConf.update(cfg, "paths.output_dir", str(run.run_dir), force_add=True)
    if data_dir is not None:
        OmegaConf.update(cfg, "paths.data_dir", str(data_dir), force_add=True)
    elif OmegaConf.select(cfg, "paths.data_dir", throw_on_missing=False) is not None:
        value = Path(str(OmegaConf.select(cfg, "paths.data_dir")))
        hydra_file = run.run_dir / ".hydra" / "hydra.yaml"
        if not value.is_absolute() and not value.exists() and hydra_file.is_file():
            cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd", default=None)
            if cwd and (Path(cwd) / value).exists():
                OmegaConf.update(cfg, "paths.data_dir", str(Path(cwd) / value))
    return OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))


def _load_dataset(run: RunData, data_dir: Optional[str]) -> Any:
    """The run's training set from its config (``None`` with a note when it cannot be loaded here)."""
    from hydra.utils import instantiate

    target = str(run.config.data.get("_target_", "?")).rsplit(".", 1)[-1]
    try:
        datamodule = instantiate(_resolved_data_config(run, data_dir))
        datamodule.setup("fit")
        dataset = getattr(datamodule, "train_set", None)
        if dataset is None:
            dataset = datamodule.train_dataloader().dataset
        size = len(dataset)
    except Exception as err:  # a missing data file, an optional package, an online-only dataset...
        run.notes.append(f"The run's dataset ({target}) could not be loaded here ({type(err).__name__}: {err}); the "
                         "dataset size was not checked and samples are shown by index. Pass --data-dir to its data.")
        return None
    if size != run.num_samples:
        raise ReportError(
            f"The history holds {run.num_samples} samples, but the run's dataset ({target} from .hydra/config.yaml) "
            f"has {size} training samples: a history from a different dataset size (another subset, split or data "
            "file). Point the report at the run that wrote the history, pass --data-dir to the data that run used, "
            "or --no-data to skip the dataset.")
    return dataset


def describe_sample(dataset: Any, index: int, width: int = 160) -> dict[str, str]:
    """The printable fields of training item ``index``: its texts (cut to ``width`` characters) and scalars.

    Example::

        >>> describe_sample([{"anchor": "How do I learn Python?", "label": 3, "image": [0.1] * 64}], 0)
        {'anchor': 'How do I learn Python?', 'label': '3'}
    """
    item = dataset[index]
    if not isinstance(item, dict):
        return {}
    out: dict[str, str] = {}
    for key, value in item.items():
        if key == "index" or type(value).__name__ == "SampleIndex":
            continue
        if isinstance(value, str):
            out[key] = value if len(value) <= width else value[: width - 1] + "…"
        elif isinstance(value, (bool, int, float, np.integer, np.floating)):
            out[key] = str(value)
        elif getattr(value, "ndim", None) == 0:
            out[key] = str(value.item())
    return out
