"""Training dynamics on CIFAR-10N ``worse``: how well each statistic finds the mislabelled samples, and what
dropping or down-weighting them after a warm-up does to clean test accuracy.

Harness: the noisy-label harness of ``benchmarks/selection_noisy.py`` (its CIFAR model settings: the small CNN,
width 32, AdamW lr 3e-3, weight decay 5e-4, batch 128, cosine schedule over the run; its per-epoch ``Recorder``),
on ``Cifar10NDataModule(label_set="worse")`` at 16 px, a stratified ``--train-subset`` of the 50k training images
(default all 50k; no holdout: every image is a training sample) and a ``--test-subset`` of the clean test images.
One run of the ``auc`` part takes about 6 minutes on 2 shared CPU cores (15 epochs).

``--part auc``: one uniform run with :class:`~lightning_select.TrainingDynamics` (an observer: the training is plain
uniform training). Per statistic, the ROC-AUC (:func:`~lightning_select.rules.dynamics.roc_auc`) with which it
ranks the truly mislabelled samples (CIFAR-10N ``worse`` label ≠ clean label): low AUM, low confidence, low
correctness, many forgetting events (never learned = ∞), high EL2N (at ``--el2n-epoch``), high variability. The
run's table is exported, and a random ``--keep-rows`` of its rows (the full 50k table and trace are ~5 MB) are kept in
``benchmarks/results/training_dynamics_cifar10n_worse.parquet`` (+ ``.json`` metadata with ``subsample``,
``_trace.npy`` per-epoch ``p(label)``; :func:`~lightning_select.stats.subsample_dynamics`): the input of the README's
cartography map.

``--part filter``: the same data, model, seed and epochs; arms ``uniform`` (TrainingDynamics only: by default the
``auc`` part's run, which is exactly that),
``drop`` (:class:`~lightning_select.DynamicsFilter`, ``mode="select"``) and ``downweight`` (``mode="weight"``,
flagged weight ``--flagged-weight``): after ``--warmup-epochs``, at every epoch start the ``--fraction`` of the
samples with the most suspicious value of ``--statistic`` (``auto``: the best statistic of the ``auc`` part) is
dropped / down-weighted. Reported: final and best clean test accuracy, wall clock, the precision of the flags
(mislabelled share among the flagged, last flagging epoch), and the mislabelled share of the trained rows.

Reproduce (1 torch thread)::

    python benchmarks/training_dynamics.py --part auc
    python benchmarks/training_dynamics.py --part filter --fraction 0.2 0.4

Writes ``benchmarks/results/training_dynamics.json`` (each part under its own key) and ``training_dynamics.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_noisy import DATASET_DEFAULTS, Recorder, machine_info  # noqa: E402

from lightning_select import DynamicsFilter, TrainingDynamics  # noqa: E402
from lightning_select.data.noisy_labels import Cifar10NDataModule  # noqa: E402
from lightning_select.models.classifier import NoisyLabelClassifier  # noqa: E402
from lightning_select.rules.dynamics import roc_auc  # noqa: E402
from lightning_select.stats import subsample_dynamics  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: statistic -> sign that makes a higher score mean "more likely mislabelled"
SIGNS = {"aum": -1, "confidence": -1, "correctness": -1, "forgetting_events": 1, "el2n": 1, "variability": 1}


def datamodule(args: argparse.Namespace, seed: int) -> Cifar10NDataModule:
    dm = Cifar10NDataModule(data_dir=args.data_dir, label_set=args.label_set, batch_size=args.batch_size,
                            image_size=args.image_size, train_subset=args.train_subset, test_subset=args.test_subset,
                            holdout_fraction=0.0, seed=seed, cache_dir=args.cache_dir, progress=False)
    dm.setup("fit")
    return dm


def fit(args: argparse.Namespace, policy: TrainingDynamics, seed: int) -> tuple[dict[str, Any], Cifar10NDataModule]:
    dm = datamodule(args, seed)
    pl.seed_everything(seed, verbose=False)
    model = NoisyLabelClassifier(**DATASET_DEFAULTS["cifar10n"]["model"], cosine_schedule=True)
    recorder = Recorder(lambda: (0, 0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=50, callbacks=[policy, recorder])
    start = time.perf_counter()
    trainer.fit(model, dm)
    val = [r["accuracy"] for r in recorder.records if r["accuracy"] is not None]
    return {"final_acc": val[-1], "best_acc": max(val), "wall_s": recorder.records[-1]["wall_s"],
            "fit_total_s": round(time.perf_counter() - start, 1), "steps": recorder.records[-1]["steps"],
            "accuracy_per_epoch": val}, dm


def aucs(stats: dict[str, torch.Tensor], noisy: torch.Tensor) -> dict[str, float]:
    seen = stats["presentations"] > 0
    return {name: roc_auc(sign * stats[name][seen].nan_to_num(posinf=float("inf")), noisy[seen])
            for name, sign in SIGNS.items()}


def part_auc(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    name = f"training_dynamics_cifar10n_{args.label_set}"
    full = Path(tempfile.mkdtemp(prefix="training_dynamics_")) / "training_dynamics.parquet"
    policy = TrainingDynamics(el2n_epoch=args.el2n_epoch, trace_epochs=args.epochs, export_path=str(full))
    run, dm = fit(args, policy, args.seed)
    noisy = dm.train_noisy_mask
    # the repository keeps a down-sampled copy (the full 50k table and trace are ~5 MB)
    rows = min(args.keep_rows, int(noisy.numel()))
    subsample_dynamics(full, args.out_dir / f"{name}.parquet", rows=rows, seed=args.seed)
    result = {"auc": aucs(policy.statistics(), noisy), "base_rate": float(noisy.float().mean()),
              "num_samples": int(noisy.numel()), "table": f"{name}.parquet", "table_rows": rows, **run}
    print(json.dumps({k: v for k, v in result.items() if k != "accuracy_per_epoch"}, indent=1), flush=True)
    return result


def part_filter(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    statistic = args.statistic
    if statistic == "auto":
        found = payload.get("parts", {}).get("auc", {}).get("auc")
        if not found:
            raise SystemExit("--statistic auto needs the results of --part auc first (or name a statistic).")
        statistic = max((s for s in found if s != "variability"), key=found.get)
    arms: list[dict[str, Any]] = []
    auc = payload.get("parts", {}).get("auc")
    if auc and not args.rerun_uniform:  # the auc part is this arm: uniform training, same data, seed and epochs
        run = {k: auc[k] for k in ("final_acc", "best_acc", "wall_s", "fit_total_s", "steps", "accuracy_per_epoch")}
        run["from_auc_part"] = True
        noisy = datamodule(args, args.seed).train_noisy_mask
    else:
        run, dm = fit(args, TrainingDynamics(el2n_epoch=args.el2n_epoch), args.seed)
        noisy = dm.train_noisy_mask
    arms.append({"arm": "uniform", **run})
    print(f"uniform: final {run['final_acc']:.4f} best {run['best_acc']:.4f} ({run['fit_total_s']} s)", flush=True)
    for fraction in args.fraction:
        for arm, mode in (("drop", "select"), ("downweight", "weight")):
            if mode not in args.modes:
                continue
            policy = DynamicsFilter(statistic=statistic, fraction=fraction, warmup_epochs=args.warmup_epochs,
                                    mode=mode, flagged_weight=args.flagged_weight, el2n_epoch=args.el2n_epoch)
            run, _ = fit(args, policy, args.seed)
            last = policy.flag_log[-1]
            entry = {"arm": arm, "fraction": fraction, "statistic": statistic, **run,
                     "flag_precision_last": last["flagged_noisy"] / last["flagged"],
                     "flag_recall_last": last["flagged_noisy"] / int(noisy.sum()),
                     "flag_log": policy.flag_log}
            arms.append(entry)
            print(f"{arm} {fraction}: final {run['final_acc']:.4f} best {run['best_acc']:.4f} precision "
                  f"{entry['flag_precision_last']:.3f} ({run['fit_total_s']} s)", flush=True)
    return {"statistic": statistic, "warmup_epochs": args.warmup_epochs, "flagged_weight": args.flagged_weight,
            "base_rate": float(noisy.float().mean()), "arms": arms}


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = ["# Training dynamics on CIFAR-10N `worse`", "",
             f"Generated by `benchmarks/training_dynamics.py`. Machine: {payload['machine']['platform']}, "
             f"{payload['machine']['cpu_count']} CPU cores (shared), 1 torch thread. Small CNN (width 32), "
             f"{s['image_size']} px, {s['train_subset']} training images (" +
             ("all of CIFAR-10's" if s["train_subset"] == 50000 else "a stratified subset") + ", no holdout), "
             f"{s['test_subset']} clean test images, batch {s['batch_size']}, {s['epochs']} epochs, cosine schedule, "
             f"seed {s['seed']} (one seed).", ""]
    auc = payload["parts"].get("auc")
    if auc:
        lines += ["## How well each statistic ranks the mislabelled samples", "",
                  f"Reproduce: `{auc['command']}`. Base rate of mislabelled training samples {auc['base_rate']:.3f}; "
                  f"the run's clean test accuracy {auc['final_acc']:.3f} (best {auc['best_acc']:.3f}); "
                  f"{auc['fit_total_s']:.0f} s. EL2N at epoch {s['el2n_epoch']}. The AUCs are over all "
                  f"{auc['num_samples']} training samples; `{auc['table']}` (+ `.json`, `_trace.npy`) keeps a random "
                  f"{auc['table_rows']} of them (the cartography map's input).", "",
                  "| statistic | suspicious when | ROC-AUC (mislabelled vs clean) |", "|---|---|---|"]
        for name, value in sorted(auc["auc"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| `{name}` | {'low' if SIGNS[name] < 0 else 'high'} | {value:.3f} |")
        lines.append("")
    filt = payload["parts"].get("filter")
    if filt:
        lines += ["## Dropping or down-weighting the flagged samples after a warm-up", "",
                  f"Reproduce: `{filt['command']}`. Statistic `{filt['statistic']}`, warm-up {filt['warmup_epochs']} "
                  f"epochs, then at every epoch start the given fraction of the samples with the most suspicious "
                  f"value is dropped (`DynamicsFilter(mode='select')`) or weighted {filt['flagged_weight']} "
                  "(`mode='weight'`); same data, seed and epochs as uniform. Precision: the mislabelled share among "
                  f"the flagged (base rate {filt['base_rate']:.3f}), at the last flagging epoch. The `uniform` row "
                  "is the run of the table above (uniform training observed by `TrainingDynamics`). Fit times are "
                  "wall clock on shared, contended cores: not comparable between rows.", "",
                  "| arm | fraction flagged | final clean acc | best clean acc | flag precision | flag recall | fit (s) |",
                  "|---|---|---|---|---|---|---|"]
        for a in filt["arms"]:
            p = f"{a['flag_precision_last']:.3f}" if "flag_precision_last" in a else "–"
            r = f"{a['flag_recall_last']:.3f}" if "flag_recall_last" in a else "–"
            lines.append(f"| `{a['arm']}` | {a.get('fraction', 0)} | {a['final_acc']:.4f} | {a['best_acc']:.4f} | {p} "
                         f"| {r} | {a['fit_total_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def draw_map(out_dir: Path) -> Path:
    """The cartography map (variability against confidence, coloured by correctness, the truly mislabelled
    samples ringed) of the table the ``auc`` part keeps, as ``training_dynamics_cifar10n_worse_map.png``."""
    import pandas as pd

    from lightning_select.report.figures import cartography_png

    table = pd.read_parquet(out_dir / "training_dynamics_cifar10n_worse.parquet")
    path = out_dir / "training_dynamics_cifar10n_worse_map.png"
    path.write_bytes(cartography_png(table["variability"].to_numpy(), table["confidence"].to_numpy(),
                                     table["correctness"].to_numpy(), table["noisy"].to_numpy()))
    print(f"wrote {path.name} ({len(table)} samples)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("auc", "filter", "map"), required=True,
                        help="map: draw the cartography map of the auc part's saved table (README figure)")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache folder (not recorded)")
    parser.add_argument("--label-set", default="worse")
    parser.add_argument("--train-subset", type=int, default=50000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=DATASET_DEFAULTS["cifar10n"]["batch_size"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--el2n-epoch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--statistic", default="auto", choices=("auto", *SIGNS))
    parser.add_argument("--fraction", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--flagged-weight", type=float, default=0.1)
    parser.add_argument("--modes", nargs="+", default=["select", "weight"], choices=("select", "weight"))
    parser.add_argument("--rerun-uniform", action="store_true", help="train the uniform arm again (default: the "
                        "auc part's run, which is uniform training with the same data, seed and epochs)")
    parser.add_argument("--keep-rows", type=int, default=5000, help="rows of the table copy kept in results/")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.data_dir is None:
        from lightning_select.data.files import DEFAULT_DATA_DIR

        args.data_dir = DEFAULT_DATA_DIR
    torch.set_num_threads(args.threads)
    if args.part == "map":
        draw_map(args.out_dir)
        return
    argv, skip = [], False
    for a in sys.argv[1:]:  # no machine paths in the results: drop the folder options from the recorded command
        if skip:
            skip = False
            continue
        if a in ("--cache-dir", "--data-dir", "--out-dir"):
            skip = True
            continue
        argv.append(a)
    command = "python benchmarks/training_dynamics.py " + " ".join(shlex.quote(a) for a in argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "training_dynamics.json"
    payload = json.loads(out.read_text()) if out.is_file() else {"parts": {}}
    settings = {k: getattr(args, k) for k in ("label_set", "train_subset", "test_subset", "image_size", "batch_size",
                                              "epochs", "el2n_epoch", "seed")}
    if payload.get("settings") not in (None, settings):
        payload = {"parts": {}}  # other settings: start a new results file
    payload.update(settings=settings, machine=machine_info(args.threads))
    result = part_auc(args) if args.part == "auc" else part_filter(args, payload)
    payload["parts"][args.part] = {**result, "command": command}
    out.write_text(json.dumps(payload, indent=1))
    (args.out_dir / "training_dynamics.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
