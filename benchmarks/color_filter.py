"""CoLoR-Filter on label noise: what the offline selection keeps, and what training on it gives.

For each seed, :func:`~lightning_select.policies.color_filter.build_color_subset_from_datamodule` builds the
subset file (prior: the harness's model trained on the noisy training split; conditional: a copy
fine-tuned on the holdout split's *clean* labels; keep the top ``1/τ`` by prior − conditional loss).
Measured on it:

* **selection**: the share of mislabelled samples among the kept against the base rate (ratio), and the
  AUC of ``−score`` as a detector of a wrong label; the same shares for other subsets of about the same
  size: ``color_stratified`` (the top ``1/τ`` of each training label by the same score: the ``stratify``
  option), ``random`` (seeded), ``prior_loss`` (the lowest loss under the prior alone: no target) and
  ``conditional_loss`` (the lowest loss under the conditional model alone); and the smallest class count
  among the kept (clean labels);
* **training**: each arm trains the harness's model (plain Lightning, scalar mean loss, cosine schedule
  over the step budget) for the *same number of optimizer steps* as ``all`` (every training sample,
  ``--epochs`` epochs), and the clean test accuracy is measured every ``1/10`` of the budget; reported:
  the final and the best accuracy;
* **cost**: the wall time of the build (prior training, fine-tune, two scoring passes) and of each arm's
  training (1 torch thread).

Reproduce::

    python benchmarks/color_filter.py --dataset digits --seeds 0 1 2
    python benchmarks/color_filter.py --dataset cifar10n --seeds 0 --epochs 12 --prior-epochs 8 \\
        --conditional-epochs 8

Writes ``benchmarks/results/color_filter.json`` (one entry per dataset, ``<dataset>_tau<τ>`` for τ ≠ 4:
records, summary, machine, command; the file's other entries are kept) and ``benchmarks/results/color_filter.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_select.data.noisy_labels import Cifar10NDataModule, NoisyDigitsDataModule
from lightning_select.data.subset_file import load_subset_file, write_subset_file
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.policies.color_filter import build_color_subset_from_datamodule
from lightning_select.rules.color_filter import keep_size, top_fraction_mask

RESULTS = Path(__file__).parent / "results"
ARMS = ("all", "color", "color_stratified", "random", "prior_loss", "conditional_loss")
DEFAULTS = {  # the harness's configs: conf/model/classifier_{mlp,cnn}.yaml, conf/experiment/{digits_noisy,cifar10n_cpu}
    "digits": {"batch_size": 64, "epochs": 20, "model": {"arch": "mlp", "hidden": 128, "lr": 3e-3, "weight_decay": 0.01}},
    "cifar10n": {"batch_size": 64, "epochs": 12, "model": {"arch": "cnn", "width": 32, "lr": 3e-3, "weight_decay": 5e-4}},
}


def make_datamodule(args: argparse.Namespace, seed: int) -> Any:
    if args.dataset == "digits":
        return NoisyDigitsDataModule(batch_size=args.batch_size, noise_rate=args.noise_rate, seed=seed)
    return Cifar10NDataModule(label_set=args.label_set, batch_size=args.batch_size, image_size=args.image_size,
                              train_subset=args.train_subset, test_subset=args.test_subset, seed=seed,
                              cache_dir=args.cache_dir, progress=False,
                              **({"data_dir": args.data_dir} if args.data_dir else {}))


class Accuracy(pl.Callback):
    """Clean test accuracy every ``every`` optimizer steps and at the end (no Lightning validation loop)."""

    def __init__(self, dm: Any, every: int) -> None:
        self.dm, self.every, self.curve = dm, every, []

    @torch.no_grad()
    def measure(self, module: Any, step: int) -> None:
        was = module.training
        module.eval()
        right = total = 0
        for batch in self.dm.test_dataloader():
            right += int((module(batch["image"]).argmax(-1) == batch["clean_label"]).sum())
            total += batch["clean_label"].numel()
        module.train(was)
        self.curve.append((step, right / total))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and step < trainer.max_steps:
            self.measure(pl_module, step)

    def on_train_end(self, trainer, pl_module):
        self.measure(pl_module, trainer.global_step)


def train_arm(args: argparse.Namespace, seed: int, subset_path: Path | None, steps: int) -> dict[str, Any]:
    dm = make_datamodule(args, seed)
    dm.setup("fit")
    # the datamodules' subset option (NoisyDigitsDataModule(sampler="subset_file") calls the same method)
    loader = dm.train_dataloader() if subset_path is None else dm.subset_dataloader(subset_path)
    pl.seed_everything(seed)
    model = NoisyLabelClassifier(**args.model, cosine_schedule=True, plain_loss=True)
    acc = Accuracy(dm, max(1, steps // 10))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[acc])
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    wall = time.perf_counter() - start
    return {"steps": int(trainer.global_step), "train_s": round(wall, 2), "final_accuracy": round(acc.curve[-1][1], 4),
            "best_accuracy": round(max(a for _, a in acc.curve), 4), "curve": [(s, round(a, 4)) for s, a in acc.curve]}


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a negative > score of a positive), ties counted half: the Mann–Whitney AUC of ``−score``."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    greater = (neg.view(-1, 1) > pos.view(1, -1)).double().mean()
    ties = (neg.view(-1, 1) == pos.view(1, -1)).double().mean()
    return float(greater + 0.5 * ties)


def run_seed(args: argparse.Namespace, seed: int, tmp: Path) -> dict[str, Any]:
    dm = make_datamodule(args, seed)
    dm.setup("fit")
    n = len(dm.train_set)
    steps = args.epochs * math.ceil(n / args.batch_size)
    path = tmp / f"color_seed{seed}.pt"
    factory = lambda: NoisyLabelClassifier(**args.model)
    start = time.perf_counter()
    build_color_subset_from_datamodule(dm, factory, path, tau=args.tau, prior_epochs=args.prior_epochs,
                                       conditional_epochs=args.conditional_epochs, lr=args.model["lr"],
                                       batch_size=args.batch_size, seed=seed, progress=False)
    build_s = time.perf_counter() - start
    subset = load_subset_file(path, dm.train_labels)
    noisy = dm.train_noisy_mask
    base = float(noisy.float().mean())
    keep = 1.0 / args.tau
    k = keep_size(keep, n)
    masks = {"color": subset.kept, "color_stratified": top_fraction_mask(subset.scores, keep, groups=subset.targets),
             "random": torch.zeros(n, dtype=torch.bool).index_fill_(
                 0, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k], True),
             "prior_loss": top_fraction_mask(-subset.prior_loss, keep),
             "conditional_loss": top_fraction_mask(-subset.conditional_loss, keep)}
    classes = int(dm.train_clean_labels.max()) + 1
    selection = {name: {"kept": int(m.sum()), "mislabelled_share": round(float(noisy[m].float().mean()), 4),
                        "ratio": round(float(noisy[m].float().mean()) / base, 4),
                        "min_class": int(torch.bincount(dm.train_clean_labels[m], minlength=classes).min())}
                 for name, m in masks.items()}
    record: dict[str, Any] = {"seed": seed, "num_samples": n, "base_rate": round(base, 4), "build_s": round(build_s, 2),
                              "auc_wrong_label": round(auc(subset.scores, noisy), 4),
                              "auc_prior_loss": round(auc(-subset.prior_loss, noisy), 4),
                              "selection": selection, "training": {}}
    for arm in args.arms:
        arm_path = None
        if arm != "all":
            arm_path = path if arm == "color" else tmp / f"{arm}_seed{seed}.pt"
            if arm != "color":
                write_subset_file(arm_path, subset.prior_loss, subset.conditional_loss, masks[arm],
                                  masks[arm].float(), subset.targets, {"arm": arm})
        record["training"][arm] = train_arm(args, seed, arm_path, steps)
        print(json.dumps({"seed": seed, "arm": arm, **{k: v for k, v in record["training"][arm].items()
                                                       if k != "curve"}}), flush=True)
    print(json.dumps({k: v for k, v in record.items() if k != "training"}), flush=True)
    return record


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "base_rate": [r["base_rate"] for r in runs],
                           "build_s": [r["build_s"] for r in runs], "auc_wrong_label": [r["auc_wrong_label"] for r in runs],
                           "auc_prior_loss": [r["auc_prior_loss"] for r in runs], "selection": {}, "training": {}}
    for name in runs[0]["selection"]:
        out["selection"][name] = {key: [r["selection"][name][key] for r in runs] for key in ("ratio", "kept", "min_class")}
    for arm in runs[0]["training"]:
        out["training"][arm] = {key: [r["training"][arm][key] for r in runs]
                                for key in ("steps", "train_s", "final_accuracy", "best_accuracy")}
    return out


def markdown(name: str, entry: dict[str, Any]) -> str:
    s, cfg = entry["summary"], entry["config"]
    lines = [f"## {name}", "",
             f"Reproduce: `{entry['command']}` ({entry['machine']['cpu_count']} CPU cores, 1 torch thread, "
             f"load average at start {entry['machine']['loadavg_start'][0]:.1f}; total {entry['total_s']:.0f} s). "
             f"τ = {cfg['tau']:g}, prior {cfg['prior_epochs']} epochs on the noisy training split, conditional "
             f"{cfg['conditional_epochs']} epochs on the holdout's clean labels; seeds {s['seeds']}.", "",
             f"Base rate of mislabelled training samples: {_ms(s['base_rate'])}. Build (prior + fine-tune + 2 scoring "
             f"passes): {_ms(s['build_s'], 1)} s. AUC of −score as a wrong-label detector: {_ms(s['auc_wrong_label'])} "
             f"(−prior loss alone: {_ms(s['auc_prior_loss'])}).", "",
             "| subset | kept | mislabelled share / base rate | smallest class among the kept |", "|---|---|---|---|"]
    for sel, v in s["selection"].items():
        lines.append(f"| {sel} | {'/'.join(str(k) for k in sorted(set(v['kept'])))} | {_ms(v['ratio'])} | "
                     f"{', '.join(str(c) for c in v['min_class'])} |")
    lines += ["", "| training arm (same optimizer steps) | steps | train wall (s) | final clean acc | best clean acc |",
              "|---|---|---|---|---|"]
    for arm, v in s["training"].items():
        lines.append(f"| {arm} | {v['steps'][0]} | {_ms(v['train_s'], 1)} | {_ms(v['final_accuracy'])} | "
                     f"{_ms(v['best_accuracy'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "cifar10n"), default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--tau", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=None, help="epochs of the `all` arm (sets the step budget)")
    p.add_argument("--prior-epochs", type=int, default=20)
    p.add_argument("--conditional-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--noise-rate", type=float, default=0.3)
    p.add_argument("--label-set", default="worse")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--data-dir", default=None, help="cifar10n: the shared data folder (default ../shared/data)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "color_filter.json"))
    args = p.parse_args()
    defaults = DEFAULTS[args.dataset]
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.model = dict(defaults["model"])
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "lightning": pl.__version__, "torch_threads": args.threads,
               "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="color_bench_") as tmp:
        runs = [run_seed(args, seed, Path(tmp)) for seed in args.seeds]
    entry = {"command": "python benchmarks/color_filter.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
             "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "cache_dir")},
             "machine": machine, "total_s": round(time.perf_counter() - start, 1), "runs": runs,
             "summary": summarise(runs)}
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.is_file() else {}
    payload[args.dataset if args.tau == 4 else f"{args.dataset}_tau{args.tau:g}"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    md = "# CoLoR-Filter on label noise\n\nWritten by `benchmarks/color_filter.py` from `color_filter.json`.\n\n" + \
        "\n".join(markdown(name, e) for name, e in payload.items())
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
