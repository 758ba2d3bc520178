"""Build a CoLoR-Filter subset file offline: ``python -m lightning_select.color_filter --out PATH``.

Trains the prior model on the noisy training split, fine-tunes a copy on the holdout split's clean
labels (the target), scores every training sample with both and writes the global top ``1/τ`` by
``prior loss − conditional loss`` (:func:`lightning_select.policies.color_filter.build_color_subset`).
Then train on it with ``python train.py +selector=color_filter data.subset_path=PATH`` (the file's
options must match the selector's, or pass ``selector.color_filter.check_options=false``), or with
``NoisyDigitsDataModule(sampler="subset_file", subset_path=PATH)``.

Examples::

    python -m lightning_select.color_filter --out outputs/color_subsets/digits_noisy_seed0_tau4.pt
    python -m lightning_select.color_filter --dataset cifar10n --train-subset 10000 --image-size 16 \\
        --tau 4 --prior-epochs 8 --conditional-epochs 8 --out outputs/color_subsets/cifar10n.pt

It prints the kept count and, on the noisy-label datamodules, the share of mislabelled samples among
the kept against the base rate. ``--export scores.parquet`` also writes the per-sample columns
(``.parquet``, ``.csv`` or ``.npz``).

Example::

    >>> parse_args(["--out", "s.pt", "--tau", "8"]).tau
    8.0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_select.color_filter", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="the subset file to write (.pt)")
    p.add_argument("--dataset", choices=("digits_noisy", "cifar10n"), default="digits_noisy")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, default=None, help="selection ratio (> 1): keep the top 1/tau (default 4)")
    sel.add_argument("--keep", type=float, default=None, help="kept fraction in (0, 1] instead of --tau")
    p.add_argument("--prior-epochs", type=int, default=20)
    p.add_argument("--conditional-epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default: the model's, 3e-3 MLP / 1e-3 CNN)")
    p.add_argument("--conditional-lr", type=float, default=None, help="fine-tune lr (default: --lr)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prior-fraction", type=float, default=1.0, help="share of the training set the prior trains on")
    p.add_argument("--prior-state", default=None, help="load the prior from this state dict / checkpoint instead")
    p.add_argument("--temperature", type=float, default=None, help="softmax weights of the kept (default: uniform)")
    p.add_argument("--stratify", action="store_true", help="keep the top 1/tau of each training label (not in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data splits and of the models")
    p.add_argument("--noise-rate", type=float, default=0.3, help="digits: symmetric label noise")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="share of the pool held out as the target")
    p.add_argument("--data-dir", default=None, help="cifar10n: the shared data folder (default ../shared/data)")
    p.add_argument("--label-set", default="worse", help="cifar10n: the CIFAR-10N label set")
    p.add_argument("--image-size", type=int, default=16, help="cifar10n: image side")
    p.add_argument("--train-subset", type=int, default=None, help="cifar10n: size of a stratified training subset")
    p.add_argument("--hidden", type=int, default=128, help="digits MLP width")
    p.add_argument("--width", type=int, default=32, help="cifar10n CNN width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--export", default=None, help="also write the per-sample columns (.parquet/.csv/.npz)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.tau is None and args.keep is None:
        args.tau = 4.0
    return args


def datamodule_and_model(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The noisy-label datamodule (set up), a model factory and its hparams, from the CLI options."""
    import torch

    from lightning_select.data.noisy_labels import Cifar10NDataModule, NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    if args.dataset == "digits_noisy":
        dm: Any = NoisyDigitsDataModule(noise_rate=args.noise_rate, holdout_fraction=args.holdout_fraction,
                                        seed=args.seed)
        hparams: dict[str, Any] = {"arch": "mlp", "hidden": args.hidden, "lr": args.lr or 3e-3, "weight_decay": 0.01}
    else:
        kwargs = {} if args.data_dir is None else {"data_dir": args.data_dir}
        dm = Cifar10NDataModule(label_set=args.label_set, image_size=args.image_size, train_subset=args.train_subset,
                                holdout_fraction=args.holdout_fraction, seed=args.seed,
                                progress=not args.no_progress, **kwargs)
        hparams = {"arch": "cnn", "width": args.width, "lr": args.lr or 1e-3}
    dm.setup("fit")
    device = torch.device(args.device)
    return dm, (lambda: NoisyLabelClassifier(**hparams).to(device)), hparams


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from lightning_select.data.subset_file import load_subset_file
    from lightning_select.io import write_table
    from lightning_select.policies.color_filter import build_color_subset_from_datamodule
    from lightning_select.rules.color_filter import keep_of

    keep_of(args.tau, args.keep)  # a bad tau / keep fails before any data is read

    dm, factory, hparams = datamodule_and_model(args)
    start = time.perf_counter()
    path = build_color_subset_from_datamodule(
        dm, factory, args.out, batch_size=args.batch_size, prior_fraction=args.prior_fraction, seed=args.seed,
        tau=args.tau, keep=args.keep, prior_epochs=args.prior_epochs, conditional_epochs=args.conditional_epochs,
        lr=hparams["lr"], conditional_lr=args.conditional_lr, temperature=args.temperature, stratify=args.stratify,
        prior_state=args.prior_state, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    subset = load_subset_file(path, dm.train_labels)
    summary: dict[str, Any] = {"path": str(path), "num_samples": subset.num_samples, "num_kept": int(subset.kept.sum()),
                               "keep": subset.meta["keep"], "build_s": round(seconds, 2)}
    noisy = getattr(dm, "train_noisy_mask", None)
    if noisy is not None and bool(noisy.any()):
        base, share = float(noisy.float().mean()), float(noisy[subset.kept].float().mean())
        summary.update(base_rate=round(base, 4), kept_mislabelled_share=round(share, 4),
                       mislabelled_ratio=round(share / base, 4))
    if args.export:
        columns = {"index": list(range(subset.num_samples)), "prior_loss": subset.prior_loss.numpy(),
                   "conditional_loss": subset.conditional_loss.numpy(), "score": subset.scores.numpy(),
                   "kept": subset.kept.numpy(), "weight": subset.weights.numpy(), "target": subset.targets.numpy()}
        if noisy is not None:
            columns["mislabelled"] = noisy.numpy()
        summary["export"] = str(write_table(columns, Path(args.export)))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
