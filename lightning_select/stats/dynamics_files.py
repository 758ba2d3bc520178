"""The training-dynamics files of a run directory: the on-disk per-epoch trace, the export, and reading them back.

**File contract** (what :class:`~lightning_select.stats.dynamics.TrainingDynamics` and
:class:`~lightning_select.policies.dbpm.DBPM` write, and what ``lightning-select report`` reads). A run
directory (the Hydra output dir, ``paths.output_dir``) may hold:

* ``training_dynamics.parquet`` (or ``.csv``): one row per training sample, ``index`` ``0 .. N-1``, and the
  columns ``confidence``, ``variability``, ``correctness``, ``forgetting_events`` (``inf`` for a sample
  never predicted correctly), ``aum``, ``el2n``, ``epochs_seen``, ``presentations``, ``label`` (the
  training label, −1 if never seen) and, when the datamodule knows the truly mislabelled samples
  (``train_noisy_mask``: CIFAR-10N, noisy digits), ``noisy``. Statistics of a sample never presented
  are NaN.
* ``training_dynamics.json``: ``num_samples``, ``epochs`` (epochs trained), ``seed``, ``config`` (the
  resolved Hydra config as a dict, or null), ``dataset`` (class name), ``statistics`` (``{name:
  {"available": bool, "reason"?: why not, "definition": ...}}``), ``bytes_per_sample``, ``el2n_epoch``
  (the epoch whose EL2N was kept), ``trace_file`` (``"training_dynamics_trace.npy"`` or null) and
  ``trace_epochs`` (the epoch of each trace column). A down-sampled copy (e.g. the benchmark's, kept small for the
  repository) adds ``subsample: {"rows": n, "seed": s}``: its rows are a random subset of the ``num_samples``
  samples, ``index`` holding their sample indices (increasing), and the trace has the same rows.
* ``training_dynamics_trace.npy`` (optional): ``[N, E]`` float32 ``p(label)`` of each sample in each
  kept epoch (NaN where not presented): the last ``trace_epochs`` epochs (in memory), or every epoch
  when the trace was spilled to disk (``trace_dir``).
* ``dbpm.parquet`` (contrastive runs with DBPM): ``index``, ``mean_loss``, ``flag`` (0 ok, 1 noisy,
  2 faulty), ``weight``, ``presentations``; ``dbpm.json``: ``mu``, ``sigma``, ``beta_np``, ``beta_fp``,
  ``warmup_epochs``, ``history``, ``epochs`` and the flag counts.
* written by others: ``loss_history.parquet`` (``LossHistory``, ``trace_*`` columns with
  ``trace_epochs > 0``), ``flagged_pairs.parquet`` (GIST), ``csv/version_*/metrics.csv`` (Lightning's
  CSVLogger) and ``.hydra/config.yaml``.

Example::

    >>> import tempfile
    >>> try:
    ...     load_dynamics(tempfile.mkdtemp())
    ... except FileNotFoundError as err:
    ...     print(str(err).split(":")[0])
    No training dynamics in this run directory
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

TABLE_NAMES = ("training_dynamics.parquet", "training_dynamics.csv")
TRACE_NAME = "training_dynamics_trace.npy"


class DiskTrace:
    """An ``[E, N]`` float32 per-epoch trace in a raw file, one contiguous block of N values per epoch.

    The file grows by one NaN-filled block when a new epoch is written (no cap on epochs); only the
    pages being written are in memory (a numpy memmap). :meth:`to_npy` writes it as an ``[N, E]``
    ``.npy`` in row chunks.

    Example::

        >>> import tempfile
        >>> trace = DiskTrace(os.path.join(tempfile.mkdtemp(), "t.f32"), num_samples=3)
        >>> trace.write(np.array([2]), np.array([0.5], dtype=np.float32), epoch=1)
        >>> trace.epochs, trace.read()[:, 1].tolist()
        (2, [nan, nan, 0.5])
    """

    def __init__(self, path: Union[str, os.PathLike], num_samples: int, epochs: int = 0) -> None:
        self.path, self.num_samples = Path(path), int(num_samples)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        block = self.num_samples * 4
        size = self.path.stat().st_size if self.path.exists() else 0
        if epochs and size < epochs * block:
            raise FileNotFoundError(
                f"The on-disk trace {str(self.path)!r} holds {size // block} epochs of {self.num_samples} samples, but "
                f"the checkpoint recorded {epochs}: the trace_dir must be kept with the run's checkpoints (or "
                "resume with a fresh trace_dir=null).")
        with open(self.path, "ab") as f:  # drop what a run wrote after the checkpoint it resumes from
            f.truncate(epochs * block)
        self.epochs = epochs
        self._map: Optional[np.memmap] = None

    def _grow(self, epochs: int) -> None:
        block = np.full(self.num_samples, np.nan, dtype=np.float32).tobytes()
        with open(self.path, "ab") as f:
            for _ in range(epochs - self.epochs):
                f.write(block)
        self.epochs, self._map = epochs, None

    def write(self, indices: np.ndarray, values: np.ndarray, epoch: int) -> None:
        """Set ``trace[epoch, indices] = values``."""
        if epoch + 1 > self.epochs:
            self._grow(epoch + 1)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.float32, mode="r+", shape=(self.epochs, self.num_samples))
        self._map[epoch, indices] = values

    def flush(self) -> None:
        if self._map is not None:
            self._map.flush()

    def read(self) -> np.ndarray:
        """The whole ``[N, E]`` trace in memory (for tests and small runs)."""
        self.flush()
        if not self.epochs:
            return np.zeros((self.num_samples, 0), dtype=np.float32)
        return np.array(np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.epochs, self.num_samples)).T)

    def to_npy(self, path: Union[str, os.PathLike], chunk: int = 65536) -> Path:
        """Write the trace as an ``[N, E]`` float32 ``.npy``, ``chunk`` samples at a time."""
        self.flush()
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(self.num_samples, self.epochs))
        if self.epochs:
            source = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.epochs, self.num_samples))
            for a in range(0, self.num_samples, chunk):
                out[a: a + chunk] = source[:, a: a + chunk].T
        out.flush()
        return Path(path)


def write_json(meta: dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """``meta`` as indented JSON (NaN and infinities as null), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(meta), indent=1, allow_nan=False))
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _table_path(run_dir: Path) -> Optional[Path]:
    if run_dir.is_file():
        return run_dir
    for name in TABLE_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def load_dynamics(run_dir: Union[str, os.PathLike], num_samples: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
    """``(table, meta)``: the per-sample dynamics table (a pandas DataFrame) and its metadata of a run directory.

    ``run_dir`` is the run directory (or the table file itself). ``num_samples``, when given, is the
    dataset size the caller expects; a table of another size is refused. The trace (if any) is
    ``np.load(run_dir / meta["trace_file"], mmap_mode="r")``.

    Raises:
        FileNotFoundError: the directory holds no ``training_dynamics.parquet``/``.csv`` (the message
            names the directory, what was looked for and how to produce it).
        ValueError: the table holds another number of samples than ``num_samples`` (or than its own
            ``training_dynamics.json`` records).
    """
    import pandas as pd

    run_dir = Path(run_dir)
    table_path = _table_path(run_dir)
    if table_path is None:
        where = "does not exist" if not run_dir.exists() else "holds none of " + ", ".join(TABLE_NAMES)
        others = sorted(p.name for p in run_dir.glob("*.parquet")) if run_dir.is_dir() else []
        raise FileNotFoundError(
            f"No training dynamics in this run directory: {str(run_dir)!r} {where}"
            + (f" (it has {', '.join(others)})" if others else "") + ". Train with the TrainingDynamics callback "
            "and an export path (`+selector=training_dynamics`, or TrainingDynamics(export_path=run_dir / "
            "'training_dynamics.parquet')), then point at that run directory.")
    table = pd.read_parquet(table_path) if table_path.suffix == ".parquet" else pd.read_csv(table_path)
    meta_path = table_path.with_suffix(".json")
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    subsample = meta.get("subsample")  # a down-sampled copy: `rows` of the run's `num_samples`, by sample index
    rows = int(subsample["rows"]) if subsample else len(table)
    recorded = meta.get("num_samples")
    if (recorded is not None and not subsample and int(recorded) != len(table)) or rows != len(table):
        raise ValueError(f"The training-dynamics table {str(table_path)!r} has {len(table)} rows but its metadata "
                         f"{str(meta_path)!r} records {recorded if not subsample else rows} samples: the files come "
                         "from different runs.")
    size = int(recorded) if subsample and recorded is not None else len(table)
    if num_samples is not None and size != int(num_samples):
        raise ValueError(
            f"The training dynamics in {str(table_path)!r} cover {size} samples, but the dataset has "
            f"{num_samples}: the history was recorded on other data (another subset, split or dataset). Use the "
            "run directory that trained on this dataset, or record the dynamics again.")
    index = table["index"].to_numpy() if "index" in table else None
    expected = "0 .. N-1 in order" if not subsample else f"increasing sample indices in [0, {size})"
    if index is not None and not (np.array_equal(index, np.arange(len(table))) if not subsample else
                                  (len(index) == 0 or (np.all(np.diff(index) > 0) and index[0] >= 0
                                                       and index[-1] < size))):
        raise ValueError(f"The training-dynamics table {str(table_path)!r} is damaged: its `index` column is not "
                         f"{expected}.")
    return table, meta


def subsample_dynamics(source: Union[str, os.PathLike], path: Union[str, os.PathLike], rows: int,
                       seed: int = 0) -> Path:
    """Write a down-sampled copy of an exported training-dynamics table (and its trace) to ``path``.

    ``rows`` samples are drawn uniformly without replacement (``numpy.random.default_rng(seed)``) and kept in
    index order; float columns are stored as float32. The metadata records ``subsample: {"rows", "seed"}``
    (:func:`load_dynamics` reads it). Returns the table's path.
    """
    from lightning_select.io import write_table

    table, meta = load_dynamics(source)
    if not 0 < rows <= len(table):
        raise ValueError(f"Expected `rows` in [1, {len(table)}] (the table's size), but got {rows}.")
    keep = np.sort(np.random.default_rng(seed).choice(len(table), size=rows, replace=False))
    columns = {}
    for name in table.columns:
        values = table[name].to_numpy()[keep]
        columns[name] = values.astype(np.float32) if values.dtype == np.float64 else values
    path = Path(path)
    write_table(columns, path)
    meta = {**meta, "subsample": {"rows": int(rows), "seed": int(seed)}}
    source_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    if meta.get("trace_file"):
        trace = np.load(source_dir / meta["trace_file"], mmap_mode="r")
        meta["trace_file"] = path.stem + "_trace.npy"
        np.save(path.with_name(meta["trace_file"]), np.asarray(trace[keep], dtype=np.float32))
    write_json(meta, path.with_suffix(".json"))
    return path
