"""Tables on disk: one writer for every export (history, per-sample statistics, flagged pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union


def write_table(columns: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write equal-length 1-d columns to ``.parquet`` (pandas + pyarrow), ``.csv`` or ``.npz``.

    Example::

        >>> import numpy as np, tempfile, os
        >>> path = write_table({"index": np.arange(3), "loss": np.ones(3)}, os.path.join(tempfile.mkdtemp(), "t.npz"))
        >>> sorted(np.load(path).files)
        ['index', 'loss']
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise ValueError(f"Expected an export path ending in .parquet, .csv or .npz, but got {path.name!r}.")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Expected columns of equal length, but got {lengths}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        import numpy as np

        np.savez(path, **columns)
        return path
    import pandas as pd

    frame = pd.DataFrame(columns)
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    return path
