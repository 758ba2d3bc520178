"""Recipe: add lightning_select to an existing LightningModule and Trainer.

An ordinary digits classifier. Only three things change (marked CHANGED):

1. the dataset is wrapped in ``IndexedDataset`` so every batch carries sample indices;
2. ``training_step`` returns the *unreduced* loss (``reduction="none"``, shape [B]);
3. the policy callbacks are added to the Trainer.

Run:  python recipes/add_to_existing_trainer.py [--epochs 10] [--export history.parquet]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_select import IndexedDataset, LossHistory


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y, _index = batch  # CHANGED: IndexedDataset appends the sample index to tuple items
        return F.cross_entropy(self.net(x), y, reduction="none")  # CHANGED: per-sample losses [B]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--export", default=None, help="write the loss history to .parquet/.csv/.npz")
    args = parser.parse_args()

    pl.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    dataset = IndexedDataset(TensorDataset(x, y))  # CHANGED: batches now carry sample indices
    loader = DataLoader(dataset, batch_size=64, shuffle=True)

    history = LossHistory(trace_epochs=args.epochs)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        callbacks=[history],  # CHANGED: add the policies
    )
    trainer.fit(DigitsClassifier(), loader)

    store = history.store
    hardest = store.ema_loss.argsort(descending=True)[:10]
    print("hardest samples (index, label, EMA loss):")
    for i in hardest.tolist():
        print(f"  {i:5d}  {int(y[i])}  {store.ema_loss[i].item():.3f}")
    print(f"samples seen: {int((store.count > 0).sum())}/{store.num_samples}, "
          f"memory {store.bytes_per_sample():.0f} bytes/sample")
    if args.export:
        print("history written to", history.export(args.export))


if __name__ == "__main__":
    main()
