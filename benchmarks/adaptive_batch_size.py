"""AdaptiveBatchSize against fixed batches on label noise: clean accuracy against samples seen and wall clock.

Every arm trains ``NoisyLabelClassifier`` (the selection benchmark's harness and model settings:
``benchmarks/selection_noisy.py``) for the same number of epochs, so every arm sees the same samples; the
arms differ in how many samples make one optimizer step. All arms use the harness's cosine schedule sized
by ``trainer.estimated_stepping_batches``; the adaptive arm runs it in sample units (``schedule="samples"``),
so every schedule ends with training.

=================  ==========================================================================
arm                optimizer step
=================  ==========================================================================
fixed              ``b`` samples (loader batch ``b``)
fixed_large        ``8·b`` samples (loader batch ``b``, ``accumulate_grad_batches=8``): the cap
adaptive           ``AdaptiveBatchSize(initial_accumulation=2, max_accumulation=16)`` on a loader
                   batch of ``b/2``: starts at ``b`` samples a step, may grow to ``8·b``
=================  ==========================================================================

Per epoch it records wall clock (validation excluded), optimizer steps, samples seen, the accumulation
in force and the clean test accuracy. Reproduce (1 torch thread)::

    python benchmarks/adaptive_batch_size.py --dataset digits --seeds 0 1 2
    python benchmarks/adaptive_batch_size.py --dataset cifar10n --seeds 0 1 2 --cache-dir /tmp/cifar_cache

Writes ``benchmarks/results/adaptive_batch_size_<dataset>.{json,png}`` and its block of
``adaptive_batch_size.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_noisy import DATASET_DEFAULTS, BatchCounter, Recorder, machine_info, make_datamodule, update_markdown  # noqa: E402

from lightning_select import AdaptiveBatchSize  # noqa: E402
from lightning_select.models.classifier import NoisyLabelClassifier  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ARMS = ("fixed", "fixed_large", "adaptive")


class AccumulationRecorder(Recorder):
    """The harness's per-epoch record plus the accumulation in force at the epoch's end."""

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self.records[-1]["accumulation"] = int(trainer.accumulate_grad_batches)


def run_one(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    b = args.batch_size
    loader_batch = b // 2 if arm == "adaptive" else b
    dm = make_datamodule(args, seed, loader_batch)
    pl.seed_everything(seed, verbose=False)
    model = NoisyLabelClassifier(**DATASET_DEFAULTS[args.dataset]["model"], cosine_schedule=True, plain_loss=True)
    counter = BatchCounter()
    recorder = AccumulationRecorder(lambda: (counter.rows, counter.mislabelled))
    callbacks: list[pl.Callback] = [counter, recorder]
    policy = None
    if arm == "adaptive":
        policy = AdaptiveBatchSize(eta=args.eta, initial_accumulation=2, max_accumulation=16,
                                   check_every=args.check_every)
        callbacks.insert(0, policy)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=args.limit_val_batches, callbacks=callbacks,
                         accumulate_grad_batches=8 if arm == "fixed_large" else 1)
    t = time.perf_counter()
    trainer.fit(model, dm)
    return {"arm": arm, "seed": seed, "loader_batch": loader_batch, "epochs": args.epochs,
            "fit_total_s": round(time.perf_counter() - t, 3), "records": recorder.records,
            "decisions": policy.decisions if policy is not None else []}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        last = [r["records"][-1] for r in mine]
        best = [max(e["accuracy"] for e in r["records"] if e["accuracy"] is not None) for r in mine]
        out[arm] = {
            "seeds": [r["seed"] for r in mine],
            "final_accuracy": [e["accuracy"] for e in last], "best_accuracy": best,
            "wall_s": [e["wall_s"] for e in last], "steps": [e["steps"] for e in last],
            "samples": [e["samples"] for e in last], "final_accumulation": [e["accumulation"] for e in last],
            "first_growth_epoch": [next((e["epoch"] for e in r["records"] if e["accumulation"] > 2), None)
                                   if arm == "adaptive" else None for r in mine],
        }
    return out


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(summary: dict[str, Any]) -> str:
    fixed_wall = statistics.mean(summary["fixed"]["wall_s"]) if "fixed" in summary else float("nan")
    rows = ["| arm | final acc | best acc | optimizer steps | samples seen | wall (s) | wall / fixed | final accumulation "
            "| first epoch with a grown batch |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        rows.append(f"| `{arm}` | {_ms(s['final_accuracy'])} | {_ms(s['best_accuracy'])} | {_ms(s['steps'], '{:.0f}')} "
                    f"| {_ms(s['samples'], '{:.0f}')} | {_ms(s['wall_s'], '{:.2f}')} "
                    f"| {statistics.mean(s['wall_s']) / fixed_wall:.2f} | {_ms(s['final_accumulation'], '{:.1f}')} "
                    f"| {_ms(s['first_growth_epoch'], '{:.1f}') if arm == 'adaptive' else '–'} |")
    return "\n".join(rows)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(ARMS):
        for j, r in enumerate(x for x in runs if x["arm"] == arm):
            recs = [e for e in r["records"] if e["accuracy"] is not None]
            kw = {"color": f"C{i}", "alpha": 0.8, "label": arm if j == 0 else None}
            ax.plot([e["samples"] for e in recs], [e["accuracy"] for e in recs], **kw)
            bx.plot([e["wall_s"] for e in recs], [e["accuracy"] for e in recs], **kw)
    ax.set_xlabel("samples seen")
    bx.set_xlabel("wall clock (s, validation excluded)")
    for a in (ax, bx):
        a.set_ylabel("clean test accuracy")
        a.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"AdaptiveBatchSize vs fixed batches ({title}; one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "cifar10n"), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="b, the fixed arm's batch")
    parser.add_argument("--eta", type=float, default=0.5)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--noise-rate", type=float, default=0.3)
    parser.add_argument("--label-set", default="worse")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--limit-val-batches", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    defaults = DATASET_DEFAULTS[args.dataset]
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"adaptive_batch_size_{args.dataset}" + ("" if args.dataset == "digits" else f"_{args.label_set}")
    out = args.out_dir / f"{stem}.json"
    command = "python benchmarks/adaptive_batch_size.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    payload: dict[str, Any] = {"command": command, "machine": machine_info(args.threads),
                               "args": {k: str(v) for k, v in vars(args).items() if k != "out_dir"}, "runs": []}
    start = time.perf_counter()
    for seed in args.seeds:
        for arm in args.arms:
            run = run_one(args, arm, seed)
            payload["runs"].append(run)
            payload["summary"], payload["total_s"] = summarise(payload["runs"]), round(time.perf_counter() - start, 1)
            out.write_text(json.dumps(payload, indent=1))
            last = run["records"][-1]
            print(f"[{arm} seed {seed}] acc {last['accuracy']} wall {last['wall_s']:.1f}s steps {last['steps']} "
                  f"accumulation {last['accumulation']}", flush=True)
    plot(payload["runs"], out.with_suffix(".png"), stem)
    block = (f"Reproduce: `{command}` (1 torch thread, {payload['machine']['cpu_count']} CPU cores; total "
             f"{payload['total_s']:.0f} s). Records: `benchmarks/results/{out.name}`, plot: `{out.with_suffix('.png').name}`."
             f"\n\nMean ± std over seeds {args.seeds}; {args.epochs} epochs for every arm, b = {args.batch_size}.\n\n"
             + table(payload["summary"]))
    update_markdown(args.out_dir / "adaptive_batch_size.md", stem, block)
    print(table(payload["summary"]))


if __name__ == "__main__":
    main()
