"""Tables on disk: one writer for every export (history, per-sample statistics, flagged pairs), and the
per-sample files keyed by sample index that offline selection builds (RHO-LOSS's irreducible-loss
table, CoLoR-Filter's subset file), checked against the training targets when read."""

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


# ---------------------------------------------------------------------------- per-sample files keyed by index
# The on-disk format of the offline per-sample files (RHO-LOSS's irreducible-loss table, CoLoR-Filter's
# subset file): a ``torch.save`` dict of ``[N]`` tensors keyed by sample index, the training targets
# stored beside them (``targets``), and ``meta`` (with ``num_samples``). A file built for other data
# (another length, order, split or label noise) is refused at load by comparing the stored targets.


def scatter_by_index(n: int, indices: Any, columns: dict[str, Any]) -> dict[str, Any]:
    """``[n]`` columns with ``columns[k][j]`` at position ``indices[j]``; every index in ``[0, n)`` must be covered.

    Float columns are NaN and integer columns -1 where nothing was scattered (never returned: a missed
    index is an error). Raises :class:`~lightning_select.core.SelectionError` naming the problem.

    Example::

        >>> import torch
        >>> scatter_by_index(3, torch.tensor([2, 0, 1]), {"loss": torch.tensor([0.2, 0.0, 0.1])})["loss"].tolist()
        [0.0, 0.10000000149011612, 0.20000000298023224]
    """
    import torch

    from lightning_select.core.context import SelectionError

    indices = torch.as_tensor(indices).long().cpu()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise SelectionError(f"Scored sample indices fall outside [0, {n}); is the scoring loader the training set?")
    seen = torch.zeros(n, dtype=torch.bool)
    seen[indices] = True
    out = {}
    for name, values in columns.items():
        values = torch.as_tensor(values).cpu()
        fill = float("nan") if values.is_floating_point() else (False if values.dtype == torch.bool else -1)
        column = torch.full((n,), fill, dtype=values.dtype)
        column[indices] = values
        out[name] = column
    missing = int((~seen).sum())
    if missing:
        raise SelectionError(f"The scoring loader missed {missing} of {n} training samples; it must cover all of them.")
    return out


def write_index_table(path: Union[str, Path], columns: dict[str, Any], meta: dict) -> Path:
    """Write ``{**columns, "meta": {**meta, "num_samples": N}}`` to ``path`` with ``torch.save``, atomically.

    ``columns`` are ``[N]`` tensors keyed by sample index (one of them ``targets``). A concurrent reader
    (another rank) never sees a partial file.
    """
    import os

    import torch

    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"Expected columns of equal length, but got {lengths}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({**columns, "meta": {**meta, "num_samples": next(iter(lengths.values()))}}, tmp)
    os.replace(tmp, path)
    return path


def _listed(keys: Any) -> str:
    names = [repr(k) for k in keys]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def read_index_table(path: Union[str, Path], keys: Any, targets: Any = None, what: str = "per-sample table",
                     hint: str = "rebuild it") -> tuple[dict[str, Any], dict]:
    """``(columns, meta)`` of a file written by :func:`write_index_table`, checked against ``targets``.

    Raises :class:`~lightning_select.core.SelectionError` naming the file, the problem and ``hint`` (the
    fix) when the file is missing, lacks one of ``keys`` (``targets`` is always required), holds
    another number of samples than ``targets``, or stores other targets at some indices.
    """
    import torch

    from lightning_select.core.context import SelectionError

    path = Path(path)
    article = "an" if what[:1].lower() in "aeiou" else "a"
    if not path.is_file():
        raise SelectionError(f"No {what} at {str(path)!r}; {hint}.")
    keys = list(dict.fromkeys([*keys, "targets"]))
    table = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(table, dict) or not set(keys) <= set(table):
        raise SelectionError(f"{str(path)!r} is not {article} {what} (expected the keys {_listed(keys)}); {hint}.")
    columns = {k: table[k] for k in keys}
    n = columns[keys[0]].numel()
    if any(v.numel() != n for v in columns.values()):
        raise SelectionError(f"The {what} {str(path)!r} is damaged: its columns have different lengths "
                             f"{ {k: v.numel() for k, v in columns.items()} }; {hint}.")
    stored = columns["targets"].long()
    if targets is not None:
        targets = torch.as_tensor(targets).long().cpu()
        if targets.numel() != n:
            raise SelectionError(f"The {what} {str(path)!r} holds {n} samples, but the training set has "
                                 f"{targets.numel()}: it was built for other data; {hint}.")
        wrong = (stored != targets).nonzero().flatten()
        if wrong.numel():
            raise SelectionError(
                f"The {what} {str(path)!r} does not match the training set: the stored targets "
                f"differ at {wrong.numel()} of {n} indices (first: {wrong[:5].tolist()}; stored "
                f"{stored[wrong[:5]].tolist()}, data {targets[wrong[:5]].tolist()}). The sample order, the split "
                f"or the label noise changed since it was built; {hint}.")
    return columns, dict(table.get("meta") or {})
