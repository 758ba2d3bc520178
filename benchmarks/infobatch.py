"""InfoBatch against uniform training on label noise: clean accuracy, wall clock and sample passes.

Every arm trains ``NoisyLabelClassifier`` (the harness's configs, ``DATASET_DEFAULTS`` of
``benchmarks/selection_noisy.py``) with a real Lightning ``Trainer`` (CPU, 1 torch thread, no logger,
no checkpointing) and the cosine learning-rate schedule, validating on the clean test split after every
epoch. Arms:

=================  ==========================================================================
arm                what
=================  ==========================================================================
uniform            plain Lightning (scalar mean loss, no engine), every sample once per epoch
infobatch          ``InfoBatch()`` with the loader's ``InfoBatchSampler(prune, delta)``, the same
                   number of epochs; the cosine schedule is re-sized at each epoch start
uniform_matched    plain Lightning for as many epochs as make InfoBatch's sample passes
                   (``round(E · passes_infobatch / passes_uniform)``): is InfoBatch better than
                   simply training less?
=================  ==========================================================================

Per run: the final clean-test accuracy, the wall clock of training (validation excluded, as
``selection_noisy.py``'s ``Recorder`` measures it), optimizer steps, and *sample passes*: the rows
trained (forward and backward), counted by ``SelectionAudit`` (InfoBatch) or from the batches
(uniform). The issue's goal: InfoBatch within 0.5 accuracy points of uniform with at least 25% fewer
sample passes.

Reproduce (1 torch thread; the runs are sequential and the JSON is rewritten after every run)::

    python benchmarks/infobatch.py --dataset digits --seeds 0 1 2
    python benchmarks/infobatch.py --dataset cifar10n --seeds 0 --cache-dir /tmp/cifar_cache

Writes ``benchmarks/results/infobatch_<dataset>.json`` and the ``<dataset>`` block of
``benchmarks/results/infobatch.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_noisy import DATASET_DEFAULTS, Recorder, machine_info, make_datamodule, trained_row_counter  # noqa: E402

from lightning_select import InfoBatch  # noqa: E402
from lightning_select.data.noisy_labels import NoisyDigitsDataModule  # noqa: E402
from lightning_select.models.classifier import NoisyLabelClassifier  # noqa: E402
from lightning_select.samplers import InfoBatchSampler, ResumableDataLoader  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ARMS = ("uniform", "infobatch", "uniform_matched")
GOAL_POINTS, GOAL_SAVING = 0.5, 0.25


def infobatch_datamodule(args: argparse.Namespace, seed: int) -> pl.LightningDataModule:
    """The arm's datamodule with InfoBatch's sampler: ``NoisyDigitsDataModule(sampler="infobatch")`` on digits; on
    CIFAR-10N (whose datamodule has no sampler option) the same ``ResumableDataLoader`` + ``InfoBatchSampler``."""
    if args.dataset == "digits":
        return NoisyDigitsDataModule(batch_size=args.batch_size, noise_rate=args.noise_rate, seed=seed,
                                     sampler="infobatch", infobatch_prune=args.prune, infobatch_delta=args.delta)
    dm = make_datamodule(args, seed, args.batch_size)

    def train_dataloader() -> ResumableDataLoader:  # one process: num_replicas=1
        sampler = InfoBatchSampler(len(dm.train_set), args.prune, args.delta, num_epochs=dm.trainer.max_epochs,
                                   seed=seed)
        return ResumableDataLoader(dm.train_set, batch_size=args.batch_size, drop_last=False, sampler=sampler)

    dm.train_dataloader = train_dataloader  # type: ignore[method-assign]
    return dm


def run_one(args: argparse.Namespace, arm: str, seed: int, epochs: int) -> dict[str, Any]:
    dm = infobatch_datamodule(args, seed) if arm == "infobatch" else make_datamodule(args, seed, args.batch_size)
    dm.setup("fit")
    pl.seed_everything(seed, verbose=False)
    model = NoisyLabelClassifier(**DATASET_DEFAULTS[args.dataset]["model"], cosine_schedule=True,
                                 plain_loss=arm != "infobatch")
    callbacks: list[pl.Callback] = []
    count, audit = trained_row_counter("uniform" if arm != "infobatch" else arm, callbacks)
    policy = None
    if arm == "infobatch":
        policy = InfoBatch()
        callbacks += [policy, audit]
    recorder = Recorder(count)
    callbacks.append(recorder)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=50, callbacks=callbacks)
    t = time.perf_counter()
    trainer.fit(model, dm)
    out: dict[str, Any] = {"arm": arm, "seed": seed, "epochs": epochs, "n_train": len(dm.train_set),
                           "fit_total_s": round(time.perf_counter() - t, 3), "records": recorder.records,
                           "final_lr": trainer.optimizers[0].param_groups[0]["lr"]}
    if policy is not None and policy.sampler is not None:
        sampler = policy.sampler
        out["kept_per_epoch"] = [sampler.kept_sizes.get(e) for e in range(epochs)]
        out["pruning_epochs"] = sampler.pruning_epochs
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        out["schedule"] = {"T_max": scheduler.T_max, "last_epoch": scheduler.last_epoch,
                           "lightning_estimate": trainer.estimated_stepping_batches}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["arm"] == "uniform"})
    out: dict[str, Any] = {"seeds": seeds, "arms": {}}
    for arm in ARMS:
        rows = []
        for seed in seeds:
            run, uni = by.get((arm, seed)), by.get(("uniform", seed))
            if run is None or uni is None:
                continue
            last, u_last = run["records"][-1], uni["records"][-1]
            rows.append({"seed": seed, "epochs": run["epochs"], "accuracy": last["accuracy"], "wall_s": last["wall_s"],
                         "steps": last["steps"], "passes": last["samples"],
                         "accuracy_minus_uniform_points": round(100 * (last["accuracy"] - u_last["accuracy"]), 3),
                         "passes_vs_uniform": round(last["samples"] / u_last["samples"], 4),
                         "wall_vs_uniform": round(last["wall_s"] / u_last["wall_s"], 4)})
        if rows:
            out["arms"][arm] = rows
    ib = out["arms"].get("infobatch", [])
    if ib:
        gap = statistics.mean(r["accuracy_minus_uniform_points"] for r in ib)
        saving = 1 - statistics.mean(r["passes_vs_uniform"] for r in ib)
        out["goal"] = {"mean_accuracy_gap_points": round(gap, 3), "mean_pass_saving": round(saving, 4),
                       "within_0.5_points": gap >= -GOAL_POINTS, "at_least_25pct_fewer_passes": saving >= GOAL_SAVING,
                       "met": gap >= -GOAL_POINTS and saving >= GOAL_SAVING}
    return out


def _ms(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def markdown(payload: dict[str, Any], name: str) -> str:
    summary = payload["summary"]
    lines = [f"Reproduce: `{payload['command']}` (1 torch thread, {payload['machine']['cpu_count']} CPU cores shared "
             f"with other jobs, load average {payload['machine']['loadavg_start'][0]:.1f} at the start; total "
             f"{payload.get('total_s', float('nan')):.0f} s). Records: `benchmarks/results/infobatch_{name}.json`. "
             f"InfoBatch r = {payload['args']['prune']}, δ = {payload['args']['delta']}; mean ± std over seeds "
             f"{summary['seeds']}.", "",
             "| arm | epochs | clean test accuracy | Δ vs uniform (points) | sample passes | passes vs uniform | "
             "optimizer steps | wall clock (s) | wall vs uniform |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, rows in summary["arms"].items():
        col = lambda k: [r[k] for r in rows]  # noqa: E731
        lines.append(f"| {arm} | {_ms(col('epochs'), '{:.0f}')} | {_ms(col('accuracy'), '{:.4f}')} | "
                     f"{_ms(col('accuracy_minus_uniform_points'), '{:+.2f}')} | {_ms(col('passes'), '{:.0f}')} | "
                     f"{_ms(col('passes_vs_uniform'), '{:.3f}')} | {_ms(col('steps'), '{:.0f}')} | "
                     f"{_ms(col('wall_s'), '{:.1f}')} | {_ms(col('wall_vs_uniform'), '{:.3f}')} |")
    goal = summary.get("goal")
    if goal:
        lines += ["", f"Goal (within {GOAL_POINTS} points of uniform with at least {GOAL_SAVING:.0%} fewer sample "
                      f"passes): **{'met' if goal['met'] else 'not met'}**; mean accuracy gap "
                      f"{goal['mean_accuracy_gap_points']:+.2f} points, mean pass saving {goal['mean_pass_saving']:.1%}."]
    return "\n".join(lines)


def update_markdown(path: Path, name: str, block: str) -> None:
    begin, end = f"<!-- BEGIN {name} (generated by benchmarks/infobatch.py) -->", f"<!-- END {name} -->"
    text = path.read_text() if path.is_file() else (
        "# InfoBatch against uniform training on label noise\n\n"
        "Generated by `benchmarks/infobatch.py` (see its docstring for the arms and what is measured).\n")
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + new + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{new}\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "cifar10n"), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the uniform and InfoBatch arms")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--prune", type=float, default=0.5, help="InfoBatch's r")
    parser.add_argument("--delta", type=float, default=0.875, help="InfoBatch's δ")
    parser.add_argument("--noise-rate", type=float, default=0.3, help="digits: symmetric noise rate")
    parser.add_argument("--label-set", default="worse", help="cifar10n: CIFAR-10N label set")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="cifar10n: decoded-image cache folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    defaults = DATASET_DEFAULTS[args.dataset]
    name = args.dataset if args.dataset == "digits" else f"{args.dataset}_{args.label_set}"
    if args.epochs and args.epochs != defaults["epochs"]:
        name += f"_{args.epochs}epochs"  # a longer or shorter run gets its own files and block
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out, md = args.out_dir / f"infobatch_{name}.json", args.out_dir / "infobatch.md"
    payload: dict[str, Any] = {
        "command": "python benchmarks/infobatch.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine_info(args.threads), "args": {k: str(v) for k, v in vars(args).items() if k != "out_dir"}, "runs": []}
    start = time.perf_counter()
    for seed in args.seeds:
        passes: dict[str, int] = {}
        for arm in [a for a in ARMS if a in args.arms]:
            epochs = args.epochs
            if arm == "uniform_matched":
                if not {"uniform", "infobatch"} <= set(passes):
                    continue
                epochs = max(1, round(args.epochs * passes["infobatch"] / passes["uniform"]))
            t = time.perf_counter()
            run = run_one(args, arm, seed, epochs)
            last = run["records"][-1]
            passes[arm] = last["samples"]
            payload["runs"].append(run)
            print(f"[{name} seed {seed}] {arm:16s} {time.perf_counter() - t:6.1f}s  epochs {epochs}  steps {last['steps']}"
                  f"  passes {last['samples']}  wall {last['wall_s']:.1f}s  acc {last['accuracy']}", flush=True)
            payload["total_s"] = round(time.perf_counter() - start, 1)
            payload["machine"]["loadavg_end"] = __import__("os").getloadavg()
            payload["summary"] = summarise(payload["runs"])
            out.write_text(json.dumps(payload, indent=1))
            if payload["summary"]["arms"]:
                update_markdown(md, name, markdown(payload, name))
    print(markdown(payload, name))


if __name__ == "__main__":
    main()
