"""Recipe: GISTEmbed on your own text pairs in a plain Lightning script (no Hydra).

Trains the tiny static student on SICK with the offline all-MiniLM-L6-v2 guide, keeps a loss history
with per-sample false-negative counts, and prints the in-batch candidates the guide removed, so you
can audit what your margin does.

Run:  python recipes/gist_text.py [--data-dir ../shared/data] [--margin 0.0] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402

from lightning_select import GuidedNegatives, LossHistory, SelectionEngine, load_guide  # noqa: E402
from lightning_select.data import SickDataModule  # noqa: E402
from lightning_select.models import TextEmbeddingModule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="gist_text_outputs")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = SickDataModule(data_dir=args.data_dir, batch_size=64)
    model = TextEmbeddingModule(student_path=str(Path(args.data_dir) / "models" / "minilm-l6-m2v-128d"))
    gist = GuidedNegatives(
        load_guide("minilm"),              # or any model id / local path; or any frozen callable
        anchor_column="anchor", positive_column="positive",   # raw-text columns of the batch
        margin=args.margin, precompute=True,                   # guide embeddings computed once, cached
        flagged_pairs_path=f"{args.out}/flagged_pairs.parquet",
    )
    history = LossHistory(export_path=f"{args.out}/loss_history.parquet")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[SelectionEngine(), gist, history])
    trainer.fit(model, data)

    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("heldout/")})
    pairs = gist.flagged_pairs()
    texts = data.train_set.dataset
    print(f"{len(pairs['anchor_index'])} flagged in-batch candidates; a few of them:")
    for n in range(min(5, len(pairs["anchor_index"]))):
        i, j = int(pairs["anchor_index"][n]), int(pairs["candidate_index"][n])
        block = ["AP", "AA", "PP"][int(pairs["block"][n])] if int(pairs["block"][n]) < 3 else "AN"
        print(f"  [{block}] guide {float(pairs['guide_score'][n]):.3f} > {float(pairs['threshold'][n]):.3f}: "
              f"{texts[i]['anchor']!r}  vs  {texts[j]['positive' if block != 'AA' else 'anchor']!r}")
    store = history.store
    print(f"samples with at least one removed false negative: {int((store.stats['false_negatives'] > 0).sum())}"
          f" of {store.num_samples}")


if __name__ == "__main__":
    main()
