"""Selection policies against uniform training on label noise: clean accuracy per step and per second.

Every arm trains ``NoisyLabelClassifier`` with a real Lightning ``Trainer`` (CPU, no logger, no
checkpointing) on a noisy-label datamodule, validating on the clean test split after every epoch
(``heldout/accuracy``). Every arm trains ``b`` rows per optimizer step where its method allows
(it loads ``load·b`` rows and keeps ``b``), and every arm gets the same number of optimizer steps as
the uniform arm (its epoch count is ``uniform_steps / steps_per_epoch``), with the harness's cosine
learning-rate schedule over that budget. Per epoch it records:

* ``wall_s``: seconds since ``on_fit_start`` (scoring passes and RHO-LOSS's irreducible-loss table
  included), validation time excluded (measured separately, ``val_s``);
* ``step_s``: the part of ``wall_s`` spent between ``on_train_batch_start`` and ``on_train_batch_end``
  of this benchmark's recorder (the rest is per-epoch and per-fit overhead: dataloader start-up,
  epoch hooks, the IL table);
* ``steps``: optimizer steps; ``samples``: trained rows (``SelectionAudit`` totals; counted from the
  batch for the plain ``uniform`` arm); ``mislabelled``: how many of them had a wrong label;
* ``accuracy``: clean test accuracy after that epoch.

Arms (``b`` = ``--batch-size``):

=============================  ======  =======================================================
arm                            loaded  policy
=============================  ======  =======================================================
uniform                        b       none (plain Lightning, scalar mean loss, no engine)
uniform_subset                 2b      ``UniformSubset(keep=0.5)``
selective_backprop             4b      ``SelectiveBackprop()`` paper rule (β=3 keeps ~1/4; first
                                       epoch trains all 4b rows per step: the paper's warm-up)
selective_backprop_composer    2b      ``SelectiveBackprop(rule="composer", keep=0.5)``
…_composer_scaled              2b      the same, scoring on inputs downscaled ×0.5 (CIFAR only)
selective_backprop_stale       4b      ``SelectiveBackprop(stale_scores=True)`` (paper rule)
importance_sampling            3b      ``ImportanceSampling(keep=1/3, score="gradient_norm")``
rho_loss                       10b     ``ReducibleLossSelection(keep=0.1)``, table built from the
                                       holdout split inside ``fit`` (time reported separately)
=============================  ======  =======================================================

Reproduce (1 torch thread, arms run sequentially; partial results are written after every run)::

    python benchmarks/selection_noisy.py --dataset digits --seeds 0 1 2
    python benchmarks/selection_noisy.py --dataset cifar10n --seeds 0 --epochs 12 \\
        --arms uniform uniform_subset selective_backprop_composer importance_sampling rho_loss
    python benchmarks/selection_noisy.py --dataset digits --summarise-only   # tables + plot from the JSON

Writes ``benchmarks/results/selection_noisy_<dataset>.json`` (records, summary, machine, versions,
command), ``selection_noisy_<dataset>.png`` and the ``<dataset>`` block of ``selection_noisy.md``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import lightning_select
from lightning_select import ImportanceSampling, SelectionAudit, SelectiveBackprop, UniformSubset
from lightning_select.data.noisy_labels import Cifar10NDataModule, NoisyDigitsDataModule
from lightning_select.models.classifier import NoisyLabelClassifier

RESULTS = Path(__file__).parent / "results"
ALL_ARMS = ("uniform", "uniform_subset", "selective_backprop", "selective_backprop_composer",
            "selective_backprop_composer_scaled", "selective_backprop_stale", "importance_sampling", "rho_loss")
LOAD = {"uniform": 1, "uniform_subset": 2, "selective_backprop": 4, "selective_backprop_composer": 2,
        "selective_backprop_composer_scaled": 2,
        "selective_backprop_stale": 4, "importance_sampling": 3, "rho_loss": 10}
DATASET_DEFAULTS = {  # the harness's configs: conf/model/classifier_{mlp,cnn}.yaml
    "digits": {"batch_size": 64, "epochs": 30, "model": {"arch": "mlp", "hidden": 128, "lr": 3e-3, "weight_decay": 0.01}},
    "cifar10n": {"batch_size": 128, "epochs": 12,
                 "model": {"arch": "cnn", "width": 32, "lr": 3e-3, "weight_decay": 5e-4}},
}


def rho_available() -> tuple[bool, str]:
    try:
        from lightning_select.policies.reducible_loss import ReducibleLossSelection  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {err}"
    return True, "ok"


class Recorder(pl.Callback):
    """Per-epoch wall clock (validation excluded), steps, trained rows, mislabelled rows, clean accuracy."""

    def __init__(self, count: Callable[[], tuple[int, int]]) -> None:
        self.count = count
        self.records: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.val_s = 0.0
        self._v0: float | None = None
        self._validated_epoch = -1

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        self.step_s = 0.0
        self._s0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._s0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_s += time.perf_counter() - self._s0

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._v0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._v0 is not None and not trainer.sanity_checking:
            self.val_s += time.perf_counter() - self._v0
            self._v0 = None
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        now = time.perf_counter()
        rows, mislabelled = self.count()
        acc = trainer.callback_metrics.get("heldout/accuracy")
        validated = self._validated_epoch == trainer.current_epoch and acc is not None
        self.records.append({
            "epoch": trainer.current_epoch, "wall_s": round(now - self.t0 - self.val_s, 4),
            "val_s": round(self.val_s, 4), "step_s": round(self.step_s, 4), "steps": int(trainer.global_step), "samples": rows,
            "mislabelled": mislabelled, "accuracy": round(float(acc), 5) if validated else None,
        })


class BatchCounter(pl.Callback):
    """Trained rows and mislabelled rows of the plain arm (every loaded row is trained)."""

    def __init__(self) -> None:
        self.rows = 0
        self.mislabelled = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows += int(batch["label"].numel())
        self.mislabelled += int((batch["label"] != batch["clean_label"]).sum())


def trained_row_counter(arm: str, callbacks: list) -> tuple[Callable[[], tuple[int, int]], SelectionAudit | None]:
    """``(count, audit)``: ``count()`` gives ``(trained rows, mislabelled rows)`` so far. The plain ``uniform``
    arm counts its batches (a ``BatchCounter`` is appended to ``callbacks``); every other arm reads a
    ``SelectionAudit``, which the caller appends after its policies (``audit`` is None for ``uniform``)."""
    if arm == "uniform":
        counter = BatchCounter()
        callbacks.append(counter)
        return (lambda: (counter.rows, counter.mislabelled)), None
    audit = SelectionAudit(datamodule_attr="train_noisy_mask")
    return (lambda: (int(audit.totals["rows"]), int(audit.totals["mislabelled"]))), audit


def make_datamodule(args: argparse.Namespace, seed: int, batch_size: int) -> pl.LightningDataModule:
    if args.dataset == "digits":
        return NoisyDigitsDataModule(batch_size=batch_size, noise_rate=args.noise_rate, seed=seed)
    return Cifar10NDataModule(label_set=args.label_set, batch_size=batch_size, image_size=args.image_size,
                              train_subset=args.train_subset, test_subset=args.test_subset, seed=seed,
                              cache_dir=args.cache_dir, progress=False)


def run_one(args: argparse.Namespace, arm: str, seed: int, uniform_steps: int | None,
            tmpdir: Path) -> dict[str, Any]:
    b = args.batch_size
    load = LOAD[arm]
    dm = make_datamodule(args, seed, load * b)
    dm.setup("fit")
    n_train = len(dm.train_set)
    steps_per_epoch = math.ceil(n_train / (load * b))
    if uniform_steps is None:
        epochs = args.epochs
    else:
        epochs = max(1, round(args.step_factor * uniform_steps / steps_per_epoch))
    val_every = 1 if args.val_every_steps <= 0 else max(1, round(args.val_every_steps / steps_per_epoch))
    epochs = max(val_every, val_every * round(epochs / val_every))  # the last epoch is always validated
    pl.seed_everything(seed, verbose=False)
    model = NoisyLabelClassifier(**DATASET_DEFAULTS[args.dataset]["model"], cosine_schedule=not args.constant_lr,
                                 plain_loss=arm == "uniform")
    callbacks: list[pl.Callback] = []
    extra: dict[str, Any] = {}
    count, audit = trained_row_counter(arm, callbacks)
    if audit is not None:
        if arm == "uniform_subset":
            callbacks.append(UniformSubset(keep=0.5, seed=seed))
        elif arm == "selective_backprop":
            callbacks.append(SelectiveBackprop(seed=seed))
        elif arm == "selective_backprop_composer":
            callbacks.append(SelectiveBackprop(rule="composer", keep=0.5, seed=seed))
        elif arm == "selective_backprop_composer_scaled":  # images only: the scoring pass at half the side
            callbacks.append(SelectiveBackprop(rule="composer", keep=0.5, seed=seed, scale_factor=0.5))
        elif arm == "selective_backprop_stale":
            callbacks.append(SelectiveBackprop(stale_scores=True, seed=seed))
        elif arm == "importance_sampling":
            sampler = ImportanceSampling(keep=1 / 3, score="gradient_norm", seed=seed)
            select = sampler.select
            extra.update(is_selecting_steps=0, is_active_steps=0)

            def counted_select(ctx: Any) -> Any:  # is the switch-on test passed (the policy's own rule)?
                out = select(ctx)
                loaded = ctx.rows.numel()
                count = max(1, round(sampler.keep * loaded))
                threshold = sampler.tau_threshold or (loaded + 3 * count) / (3 * count)
                extra["is_selecting_steps"] += 1
                extra["is_active_steps"] += int(sampler.always_on or sampler.tau > threshold)
                extra["is_tau_ema_final"], extra["is_tau_threshold"] = round(sampler.tau, 4), round(threshold, 4)
                return out
            sampler.select = counted_select  # type: ignore[method-assign]
            callbacks.append(sampler)
        elif arm == "rho_loss":
            from lightning_select.policies.reducible_loss import ReducibleLossSelection

            table = tmpdir / f"il_{args.dataset}_{arm}_seed{seed}.pt"
            table.unlink(missing_ok=True)  # built inside fit, so its cost is in the arm's wall clock
            rho = ReducibleLossSelection(table, keep=0.1, seed=seed, il_epochs=args.il_epochs, progress=False)
            build = rho.build_table

            def timed_build(trainer: Any, pl_module: Any) -> None:
                t = time.perf_counter()
                build(trainer, pl_module)
                extra["table_build_s"] = round(time.perf_counter() - t, 4)
            rho.build_table = timed_build  # type: ignore[method-assign]
            extra["il_epochs"] = args.il_epochs
            callbacks.append(rho)
        else:
            raise ValueError(f"unknown arm {arm!r}")
        callbacks.append(audit)
    recorder = Recorder(count)
    callbacks.append(recorder)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=val_every, limit_val_batches=args.limit_val_batches,
                         log_every_n_steps=50, callbacks=callbacks)
    t = time.perf_counter()
    trainer.fit(model, dm)
    total = time.perf_counter() - t
    base_rate = float(dm.train_noisy_mask.float().mean())
    return {"arm": arm, "seed": seed, "loaded_batch": load * b, "trained_per_step": b, "epochs": epochs,
            "steps_per_epoch": steps_per_epoch, "val_every_n_epochs": val_every, "n_train": n_train,
            "base_rate": base_rate, "fit_total_s": round(total, 3), "records": recorder.records, **extra}


# ---------------------------------------------------------------------------------------------------- summary
def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["arm"] == "uniform"})
    arms = [a for a in ALL_ARMS if any(r["arm"] == a for r in runs)]
    out: dict[str, Any] = {"arms": {}, "seeds": seeds}
    for arm in arms:
        per_seed = []
        for seed in seeds:
            run, uni = by.get((arm, seed)), by.get(("uniform", seed))
            if run is None or uni is None:
                continue
            u_val = [r for r in uni["records"] if r["accuracy"] is not None]
            u_steps, u_wall, u_final = uni["records"][-1]["steps"], uni["records"][-1]["wall_s"], u_val[-1]["accuracy"]
            u_best = max(r["accuracy"] for r in u_val)
            val = [r for r in run["records"] if r["accuracy"] is not None]
            at_steps = [r for r in val if r["steps"] <= u_steps]
            at_wall = [r for r in val if r["wall_s"] <= u_wall]
            reach = next((r for r in val if r["accuracy"] >= u_final - 1e-9), None)
            last = run["records"][-1]
            early = [r for r in run["records"] if r["steps"] <= 0.25 * last["steps"]] or run["records"][:1]
            early = early[-1]
            per_seed.append({
                "seed": seed, "uniform_steps": u_steps, "uniform_wall_s": u_wall, "uniform_final_acc": u_final,
                "acc_at_step_budget": at_steps[-1]["accuracy"] if at_steps else None,
                "acc_at_wall_budget": at_wall[-1]["accuracy"] if at_wall else None,
                "wall_to_uniform_final_s": reach["wall_s"] if reach else None,
                "wall_ratio_to_uniform": reach["wall_s"] / u_wall if reach else None,
                "final_acc": val[-1]["accuracy"], "best_acc": max(r["accuracy"] for r in val),
                "steps": last["steps"], "wall_s": last["wall_s"], "samples": last["samples"],
                "mislabelled_share": last["mislabelled"] / last["samples"] if last["samples"] else None,
                "base_rate": run["base_rate"],
                "mislabelled_ratio": (last["mislabelled"] / last["samples"]) / run["base_rate"]
                if last["samples"] and run["base_rate"] > 0 else None,
                "mislabelled_ratio_first_quarter": (early["mislabelled"] / early["samples"]) / run["base_rate"]
                if early["samples"] and run["base_rate"] > 0 else None,
                "step_s": last["step_s"],
                "wall_to_uniform_best_s": next((r["wall_s"] for r in val if r["accuracy"] >= u_best - 1e-9), None),
                "table_build_s": run.get("table_build_s"),
            })
        out["arms"][arm] = per_seed
    return out


def tables_markdown(summary: dict[str, Any], dataset: str, runs: list[dict[str, Any]] | None = None) -> str:
    arms = summary["arms"]
    summary = {**summary, "_runs": {a: [r for r in (runs or []) if r["arm"] == a] for a in arms}}
    n = len(summary["seeds"])
    lines = [(f"Mean ± std over {n} seed(s) ({', '.join(map(str, summary['seeds']))}). Budgets are the uniform "
              "arm's (same seed): its total optimizer steps and its total wall clock (validation excluded)."), "",
             ("| arm | loaded / trained per step | steps | trained rows | wall (s) | (a) acc @ uniform's steps "
             "| (b) acc @ uniform's wall | final acc | best acc | (c) wall to uniform's final acc (s) "
             "| (c) ratio to uniform's wall | (c′) ratio, to uniform's best acc | (d) mislabelled share / base rate "
             "| (d) over the first 25% of steps |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, rows in arms.items():
        if not rows:
            continue
        reached = [r for r in rows if r["wall_to_uniform_final_s"] is not None]
        reach_s = _ms([r["wall_to_uniform_final_s"] for r in reached], "{:.2f}")
        ratio = _ms([r["wall_ratio_to_uniform"] for r in reached], "{:.2f}")
        if len(reached) < len(rows):
            miss = f" (not reached in {len(rows) - len(reached)}/{len(rows)})"
            reach_s = "not reached" if not reached else reach_s + miss
            ratio = "not reached" if not reached else ratio + miss
        got_best = [r["wall_to_uniform_best_s"] / r["uniform_wall_s"] for r in rows
                    if r["wall_to_uniform_best_s"] is not None]
        best_ratio = "not reached" if not got_best else _ms(got_best, "{:.2f}") + (
            f" (not reached in {len(rows) - len(got_best)}/{len(rows)})" if len(got_best) < len(rows) else "")
        load = LOAD[arm]
        varies = arm in ("selective_backprop", "selective_backprop_stale")
        per_step = f"{load}b / {'~b, varies' if varies else 'b'}"
        wall = _ms([r["wall_s"] for r in rows], "{:.2f}") + f" (in steps {_ms([r['step_s'] for r in rows], '{:.2f}')})"
        if arm == "rho_loss" and rows[0].get("table_build_s") is not None:
            wall += f" (table {_ms([r['table_build_s'] for r in rows], '{:.2f}')})"
        lines.append("| " + " | ".join([
            f"`{arm}`", per_step, _ms([r["steps"] for r in rows], "{:.0f}"),
            _ms([r["samples"] for r in rows], "{:.0f}"), wall,
            _ms([r["acc_at_step_budget"] for r in rows]), _ms([r["acc_at_wall_budget"] for r in rows]),
            _ms([r["final_acc"] for r in rows]), _ms([r["best_acc"] for r in rows]), reach_s, ratio,
            best_ratio,
            _ms([r["mislabelled_ratio"] for r in rows], "{:.2f}"),
            _ms([r["mislabelled_ratio_first_quarter"] for r in rows], "{:.2f}")]) + " |")
    windows = ((0.0, 0.05), (0.05, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0))
    lines += ["", ("Mislabelled share of trained rows / base rate, by window of training progress (optimizer steps; "
                   "from the per-epoch records, so a window is rounded to epoch boundaries):"), "",
              "| arm | " + " | ".join(f"{int(100 * a)}–{int(100 * z)}%" for a, z in windows) + " |",
              "|---|" + "---|" * len(windows)]
    for arm in arms:
        cells = []
        for a, z in windows:
            vals = []
            for run in summary.get("_runs", {}).get(arm, []):
                recs, total = run["records"], run["records"][-1]["steps"]
                lo = [r for r in recs if r["steps"] <= a * total]
                hi = [r for r in recs if r["steps"] <= z * total] or recs[:1]
                r0 = lo[-1] if lo else {"samples": 0, "mislabelled": 0}
                rows_n, mis = hi[-1]["samples"] - r0["samples"], hi[-1]["mislabelled"] - r0["mislabelled"]
                if rows_n > 0:
                    vals.append(mis / rows_n / run["base_rate"])
            cells.append(_ms(vals, "{:.2f}"))
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    base = [r["base_rate"] for rows in arms.values() for r in rows]
    lines += ["", (f"Base rate of mislabelled training samples: {_ms(base, '{:.3f}')} ({dataset}). "
              "*wall* is seconds since fit start with validation excluded; *in steps* is the part of it spent "
              "between batch start and batch end (forward, scoring pass, selection, backward, optimizer); the rest "
              "is per-epoch overhead (loader start-up, epoch hooks) and, for `rho_loss`, the irreducible-loss "
              "table. (c) uses the first validated epoch whose clean accuracy is at least uniform's final "
              "accuracy. A (b) of n/a means the arm had not finished one validated epoch within uniform's wall "
              "clock. Trained rows count draws with replacement (importance sampling) once per draw.")]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    cmap = plt.get_cmap("tab10")
    arms = [a for a in ALL_ARMS if summary["arms"].get(a)]
    for arm in arms:
        i = ALL_ARMS.index(arm)  # one colour per arm across datasets
        seed_runs = [r for r in runs if r["arm"] == arm]
        epochs = min(len(r["records"]) for r in seed_runs)
        xs, mean, lo, hi = [], [], [], []
        for e in range(epochs):
            recs = [r["records"][e] for r in seed_runs]
            accs = [r["accuracy"] for r in recs]
            if any(a is None for a in accs):
                continue
            xs.append(statistics.mean(r["wall_s"] for r in recs))
            mean.append(statistics.mean(accs))
            lo.append(min(accs))
            hi.append(max(accs))
        style = "-" if arm == "uniform" else "--" if arm.startswith("selective") else "-."
        ax.plot(xs, mean, style, color=cmap(i), label=arm, lw=2.2 if arm == "uniform" else 1.5)
        ax.fill_between(xs, lo, hi, color=cmap(i), alpha=0.15)
    u = summary["arms"].get("uniform") or []
    if u:
        ax.axhline(statistics.mean(r["uniform_final_acc"] for r in u), color="grey", lw=0.8, ls=":",
                   label="uniform final acc")
        ax.axvline(statistics.mean(r["uniform_wall_s"] for r in u), color="grey", lw=0.8, ls=":")
    ax.set_xlabel("wall clock since fit start, validation excluded (s)")
    ax.set_ylabel("clean test accuracy")
    ax.set_title(f"{title}: clean accuracy vs wall clock (mean over seeds, shaded min/max)")
    lows = [r["final_acc"] for rows in summary["arms"].values() for r in rows]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.15), min(1.0, max(r["best_acc"] for rows in summary["arms"].values()
                                                              for r in rows) + 0.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ratios = [[r["mislabelled_ratio"] for r in summary["arms"][a]] for a in arms]
    m = [statistics.mean(v) for v in ratios]
    bx.barh(range(len(arms)), m, color=[cmap(ALL_ARMS.index(a)) for a in arms],
            xerr=[[mm - min(v) for mm, v in zip(m, ratios)], [max(v) - mm for mm, v in zip(m, ratios)]])
    for k, (v, vals) in enumerate(zip(m, ratios)):
        bx.text(max(vals) + 0.05, k, f"{v:.2f}", va="center", fontsize=8)
    early = []  # the first 5% of optimizer steps (rounded to epochs)
    for arm in arms:
        vals = []
        for run in (r for r in runs if r["arm"] == arm):
            recs = run["records"]
            hi = [r for r in recs if r["steps"] <= 0.05 * recs[-1]["steps"]] or recs[:1]
            if hi[-1]["samples"]:
                vals.append(hi[-1]["mislabelled"] / hi[-1]["samples"] / run["base_rate"])
        early.append(statistics.mean(vals) if vals else float("nan"))
    bx.plot(early, range(len(arms)), "kx", ms=7, label="first 5% of steps")
    bx.set_yticks(range(len(arms)), arms, fontsize=8)
    bx.invert_yaxis()
    bx.axvline(1.0, color="black", lw=0.8, label="base rate (1×)")
    bx.axvline(0.5, color="red", lw=0.8, ls="--", label="RHO-LOSS goal (0.5×)")
    bx.set_xlabel("mislabelled share of trained rows / base rate")
    bx.set_title("mislabelled ratio over all of training")
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    bx.set_xlim(0, max(1.6, max(m) + 0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_markdown(path: Path, dataset: str, block: str) -> None:
    begin, end = f"<!-- BEGIN {dataset} (generated by benchmarks/selection_noisy.py) -->", f"<!-- END {dataset} -->"
    text = path.read_text() if path.is_file() else "# Selection policies against uniform training on label noise\n\n"
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        a, z = text.index(begin), text.index(end) + len(end)
        text = text[:a] + new + text[z:]
    else:
        text = text.rstrip("\n") + f"\n\n## {dataset}\n\n{new}\n"
    path.write_text(text)


def machine_info(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": pl.__version__,
            "lightning_select": getattr(lightning_select, "__version__", "unknown"), "torch_threads": threads,
            "loadavg_start": os.getloadavg()}


def finish(payload: dict[str, Any], out: Path, md: Path, dataset: str) -> None:
    payload["summary"] = summarise(payload["runs"])
    out.write_text(json.dumps(payload, indent=1))
    if payload["summary"]["arms"].get("uniform"):
        plot(payload["runs"], payload["summary"], out.with_suffix(".png"), dataset)
        cmd = payload["command"] + "".join(f"`, then `{c}" for c in payload.get("resumed_with", []))
        total = payload.get("total_s", float("nan")) + (payload.get("total_s_before_resume") or 0.0)
        block = (f"Reproduce: `{cmd}` (1 torch thread; {payload['machine']['cpu_count']} CPU cores shared with "
                 f"another job; total {total:.0f} s). Records: "
                 f"`{out.relative_to(RESULTS.parent.parent) if out.is_relative_to(RESULTS.parent.parent) else out}`, "
                 f"plot: `{out.with_suffix('.png').name}`.\n\n" + tables_markdown(payload["summary"], dataset, payload["runs"]))
        update_markdown(md, dataset, block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "cifar10n"), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ALL_ARMS), choices=ALL_ARMS)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the uniform arm (sets the step budget)")
    parser.add_argument("--batch-size", type=int, default=None, help="b, the trained rows per optimizer step")
    parser.add_argument("--step-factor", type=float, default=1.0,
                        help="other arms get step_factor × the uniform arm's optimizer steps")
    parser.add_argument("--constant-lr", action="store_true", help="no cosine schedule")
    parser.add_argument("--noise-rate", type=float, default=0.3, help="digits: symmetric noise rate")
    parser.add_argument("--label-set", default="worse", help="cifar10n: CIFAR-10N label set")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="cifar10n: decoded-image cache folder")
    parser.add_argument("--il-epochs", type=int, default=20, help="rho_loss: epochs of the irreducible-loss model")
    parser.add_argument("--val-every-steps", type=int, default=0,
                        help="validate every ~this many optimizer steps (0: every epoch)")
    parser.add_argument("--limit-val-batches", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON and skip them")
    parser.add_argument("--summarise-only", action="store_true", help="recompute summary, tables and plot only")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    defaults = DATASET_DEFAULTS[args.dataset]
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # the `worse` labels keep the historical name; other CIFAR-10N label sets get their own files and block
    name = args.dataset if args.dataset == "digits" or args.label_set == "worse" else f"{args.dataset}_{args.label_set}"
    out = args.out_dir / f"selection_noisy_{name}.json"
    md = args.out_dir / "selection_noisy.md"
    if args.summarise_only:
        payload = json.loads(out.read_text())
        finish(payload, out, md, name)
        print(tables_markdown(payload["summary"], name, payload["runs"]))
        return

    ok, why = rho_available()
    arms = [a for a in args.arms if a != "rho_loss" or ok]
    payload: dict[str, Any] = {
        "command": "python benchmarks/selection_noisy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine_info(args.threads), "args": {k: str(v) for k, v in vars(args).items() if k != "out_dir"},
        "rho_loss_available": ok, "rho_loss_import": why, "runs": []}
    done: set[tuple[str, int]] = set()
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        payload["runs"] = previous["runs"]
        payload["resumed_with"] = previous.get("resumed_with", []) + [payload["command"]]
        payload["command"], payload["total_s_before_resume"] = previous["command"], previous.get("total_s")
        done = {(r["arm"], r["seed"]) for r in payload["runs"]}
    order = ["uniform"] + [a for a in arms if a != "uniform"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selection_noisy_") as tmp:
        for seed in args.seeds:
            uni = next((r for r in payload["runs"] if r["arm"] == "uniform" and r["seed"] == seed), None)
            for arm in order:
                if (arm, seed) in done:
                    continue
                u_steps = None if arm == "uniform" else uni["records"][-1]["steps"] if uni else None
                if arm != "uniform" and u_steps is None:
                    raise RuntimeError("the uniform arm must run first for each seed (it sets the step budget)")
                t = time.perf_counter()
                run = run_one(args, arm, seed, u_steps, Path(tmp))
                if arm == "uniform":
                    uni = run
                payload["runs"].append(run)
                last = run["records"][-1]
                print(f"[{args.dataset} seed {seed}] {arm:28s} {time.perf_counter() - t:7.1f}s  steps {last['steps']}"
                      f"  wall {last['wall_s']:.2f}s  acc {last['accuracy']}  rows {last['samples']}"
                      f"  ratio {last['mislabelled'] / max(last['samples'], 1) / run['base_rate']:.2f}"
                      + (f"  table {run['table_build_s']}s" if "table_build_s" in run else ""), flush=True)
                payload["total_s"] = round(time.perf_counter() - start, 1)
                payload["machine"]["loadavg_end"] = os.getloadavg()
                finish(payload, out, md, name)
    print(tables_markdown(payload["summary"], args.dataset, payload["runs"]))


if __name__ == "__main__":
    main()
