"""Where the offline data lives, and readers for its files (Quora TSV, SICK, STS benchmark).

The files are read from a data folder (``data_dir``, default ``../shared/data``; the environment
variable ``LIGHTNING_SELECT_DATA`` overrides that default). Nothing is downloaded unless a
Hugging Face dataset name is given explicitly (:func:`quora_from_hf`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DEFAULT_DATA_DIR = "../shared/data"
DATA_ENV_VAR = "LIGHTNING_SELECT_DATA"
QUORA_FILE = "text_pairs/quora/quora_duplicate_questions.tsv.gz"
SICK_DIR = "text_pairs/sick2014"
STSB_DIR = "text_pairs/stsbenchmark"
_SICK_FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def resolve_data_dir(data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR) -> Path:
    """The data folder to read from.

    ``None`` or the default ``"../shared/data"`` is replaced by ``$LIGHTNING_SELECT_DATA`` when that
    variable is set; any other value is used as given.

    Example::

        >>> str(resolve_data_dir("/tmp/my-data"))
        '/tmp/my-data'
    """
    if data_dir is None or str(data_dir) == DEFAULT_DATA_DIR:
        data_dir = os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def require_file(data_dir: Union[str, os.PathLike, None], relative: str) -> Path:
    root = resolve_data_dir(data_dir)
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the data file {str(path)!r} (data folder {str(root)!r} + {relative!r}), but it does not "
            f"exist. Pass `data_dir=` pointing at the shared data folder, or set the environment variable "
            f"{DATA_ENV_VAR}."
        )
    return path


def read_quora_tsv(path: Path) -> "pd.DataFrame":
    import pandas as pd

    df = pd.read_csv(path, sep="\t", compression="gzip", keep_default_na=False)
    expected = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"Expected the columns {expected} in {str(path)!r}, but {missing} are missing.")
    return df


def quora_from_hf(name: str) -> "pd.DataFrame":
    """Rows ``qid1, qid2, question1, question2, is_duplicate`` from a Hugging Face dataset.

    Understands the legacy ``quora`` layout (``questions: {id, text}``, ``is_duplicate``), tables
    with the TSV's own columns, and ``question1/question2/label`` tables (GLUE QQP); where there are
    no question ids, identical texts share one id. All splits are concatenated (the split is ours).
    """
    import datasets  # lazy: optional, and it needs the network
    import pandas as pd

    loaded = datasets.load_dataset(name)
    splits = list(loaded.values()) if isinstance(loaded, dict) else [loaded]
    frames = []
    for split in splits:
        cols = set(split.column_names)
        if "questions" in cols and "is_duplicate" in cols:
            q = split["questions"]
            frames.append(
                pd.DataFrame(
                    {
                        "qid1": [int(x["id"][0]) for x in q],
                        "qid2": [int(x["id"][1]) for x in q],
                        "question1": [x["text"][0] for x in q],
                        "question2": [x["text"][1] for x in q],
                        "is_duplicate": [int(bool(d)) for d in split["is_duplicate"]],
                    }
                )
            )
        elif {"question1", "question2"} <= cols and ({"is_duplicate", "label"} & cols):
            frame = split.to_pandas()
            if "is_duplicate" not in frame.columns:
                frame["is_duplicate"] = frame["label"]
            frames.append(frame)
        else:
            raise ValueError(
                f"Expected a Quora-style dataset with `questions`+`is_duplicate` or `question1`/`question2`+"
                f"`is_duplicate`/`label` columns, but {name!r} has {sorted(cols)}."
            )
    df = pd.concat(frames, ignore_index=True)
    df["question1"] = df["question1"].fillna("").astype(str)
    df["question2"] = df["question2"].fillna("").astype(str)
    df["is_duplicate"] = (df["is_duplicate"].astype(int) == 1).astype(int)
    if "qid1" not in df.columns or "qid2" not in df.columns:
        codes, _ = pd.factorize(pd.concat([df["question1"], df["question2"]], ignore_index=True))
        df["qid1"], df["qid2"] = codes[: len(df)], codes[len(df) :]
    return df


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_sick(
    data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR, split: str = "test"
) -> tuple[list[str], list[str], Tensor]:
    """SICK 2014 sentence pairs and relatedness scores (1–5).

    Args:
        data_dir: data folder holding ``text_pairs/sick2014``.
        split: ``"train"``, ``"trial"`` or ``"test"``.

    Returns:
        ``(sentence_A, sentence_B, relatedness)`` with ``relatedness`` a ``[N]`` float tensor.
    """
    if split not in _SICK_FILES:
        raise ValueError(f"Expected `split` in {sorted(_SICK_FILES)}, but got {split!r}.")
    path = require_file(data_dir, f"{SICK_DIR}/{_SICK_FILES[split]}")
    rows = _read_tsv(path)
    header, body = rows[0], rows[1:]
    try:
        ia, ib, ir = header.index("sentence_A"), header.index("sentence_B"), header.index("relatedness_score")
    except ValueError as err:
        raise ValueError(
            f"Expected a header with sentence_A, sentence_B and relatedness_score in {str(path)!r}, but got {header}."
        ) from err
    body = [r for r in body if r]
    return [r[ia] for r in body], [r[ib] for r in body], torch.tensor([float(r[ir]) for r in body])


def load_stsb(
    data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR, split: str = "test"
) -> tuple[list[str], list[str], Tensor]:
    """STS benchmark sentence pairs and gold similarity scores (0–5).

    ``sts-{split}.csv`` are TAB-separated without a header: ``genre, file, year, id, score,
    sentence1, sentence2``; some rows carry two extra trailing columns (source notes), which are
    ignored. Quotes are literal (``csv.QUOTE_NONE``).

    Args:
        data_dir: data folder holding ``text_pairs/stsbenchmark``.
        split: ``"train"``, ``"dev"`` or ``"test"``.

    Returns:
        ``(sentence1, sentence2, scores)`` with ``scores`` a ``[N]`` float tensor.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"Expected `split` in ['dev', 'test', 'train'], but got {split!r}.")
    path = require_file(data_dir, f"{STSB_DIR}/sts-{split}.csv")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for line, row in enumerate(_read_tsv(path), start=1):
        if not row:
            continue
        if len(row) < 7:
            raise ValueError(
                f"Expected at least 7 tab-separated columns in {str(path)!r} line {line}, but got {len(row)}."
            )
        scores.append(float(row[4]))
        s1.append(row[5])
        s2.append(row[6])
    return s1, s2, torch.tensor(scores)
