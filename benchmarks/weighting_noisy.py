"""Hard-example weighting (focal, OHEM, loss-softmax) against uniform training on noisy digits.

Reuses the harness of ``benchmarks/selection_noisy.py`` (datamodule, per-epoch ``Recorder``, ``BatchCounter``,
model settings, machine info): ``NoisyLabelClassifier`` (MLP, hidden 128, AdamW 3e-3, cosine schedule) is trained
with a real Lightning ``Trainer`` on noisy digits, validated on the clean test split after every epoch. Every arm
gets the uniform arm's number of optimizer steps (same seed) and trains ``b = 64`` rows per step:

=====================  ======  ==================================================================
arm                    loaded  policy
=====================  ======  ==================================================================
uniform                b       none (plain Lightning, scalar mean loss, no engine)
focal                  b       ``FocalWeighting(gamma=2)`` (the exact focal-loss gradient)
focal_value            b       ``FocalWeighting(gamma=2, match="value")`` (the detached focal weight)
loss_softmax           b       ``LossSoftmaxWeighting(temperature=1, max_weight_ratio=10)``
ohem_select            4b      ``OHEM(keep=0.25, mode="select")``: scoring pass, train the top b
ohem_weight            4b      ``OHEM(keep=0.25, mode="weight")``: 0/1 weights on the 4b training pass
uniform_subset         4b      ``UniformSubset(keep=0.25)``: OHEM's baseline at the same loaded/trained rows
=====================  ======  ==================================================================

Per run: clean test accuracy (final and best), wall clock since fit start with validation excluded, the time
inside training steps, and from ``SelectionAudit`` the mislabelled share of the trained rows and of the *total
weight* (``weighted_ratio``: share of the weight on mislabelled rows / their base rate). ``--cost`` adds a
per-step timing of OHEM's two modes on a wider MLP (hidden 2048, loaded batch 1024), where compute, not
per-step overhead, dominates.

Reproduce (1 torch thread)::

    python benchmarks/weighting_noisy.py --seeds 0 1 2
    python benchmarks/weighting_noisy.py --cost-only
    python benchmarks/weighting_noisy.py --seeds 0 1 2 --noise-rate 0.6 --arms uniform focal focal_value loss_softmax ohem_select

Writes ``benchmarks/results/weighting_noisy_digits.json`` (every noise rate run is kept under its own key) and
``weighting_noisy_digits.md``.
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
from selection_noisy import DATASET_DEFAULTS, Recorder, _ms, machine_info, make_datamodule, trained_row_counter

from lightning_select import OHEM, FocalWeighting, LossSoftmaxWeighting, UniformSubset
from lightning_select.models.classifier import NoisyLabelClassifier

RESULTS = Path(__file__).parent / "results"
ARMS = ("uniform", "focal", "focal_value", "loss_softmax", "ohem_select", "ohem_weight", "uniform_subset")
LOAD = {"uniform": 1, "focal": 1, "focal_value": 1, "loss_softmax": 1, "ohem_select": 4, "ohem_weight": 4,
        "uniform_subset": 4}


def policies(arm: str, seed: int) -> list[pl.Callback]:
    return {"uniform": [], "focal": [FocalWeighting(gamma=2.0)],
            "focal_value": [FocalWeighting(gamma=2.0, match="value")],
            "loss_softmax": [LossSoftmaxWeighting(temperature=1.0, max_weight_ratio=10.0)],
            "ohem_select": [OHEM(keep=0.25, mode="select")], "ohem_weight": [OHEM(keep=0.25, mode="weight")],
            "uniform_subset": [UniformSubset(keep=0.25, seed=seed)]}[arm]


def run_one(args: argparse.Namespace, arm: str, seed: int, uniform_steps: int | None) -> dict[str, Any]:
    b, load = args.batch_size, LOAD[arm]
    dm = make_datamodule(args, seed, load * b)
    dm.setup("fit")
    steps_per_epoch = math.ceil(len(dm.train_set) / (load * b))
    epochs = args.epochs if uniform_steps is None else max(1, round(uniform_steps / steps_per_epoch))
    pl.seed_everything(seed, verbose=False)
    model = NoisyLabelClassifier(**DATASET_DEFAULTS[args.dataset]["model"], cosine_schedule=True,
                                 plain_loss=arm == "uniform")
    callbacks: list[pl.Callback] = policies(arm, seed)
    count, audit = trained_row_counter(arm, callbacks)
    if audit is not None:
        callbacks.append(audit)
    recorder = Recorder(count)
    callbacks.append(recorder)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=50, callbacks=callbacks)
    t = time.perf_counter()
    trainer.fit(model, dm)
    total = time.perf_counter() - t
    base = float(dm.train_noisy_mask.float().mean())
    last = recorder.records[-1]
    val = [r["accuracy"] for r in recorder.records if r["accuracy"] is not None]
    row_ratio = last["mislabelled"] / last["samples"] / base
    if arm == "uniform":
        weighted_ratio, trained_rows = row_ratio, last["samples"]
    else:
        weighted_ratio = audit.weighted_ratio
        trained_rows = int(audit.totals["rows"]) if arm != "ohem_weight" else round(float(audit.totals["weight"]))
    summary = callbacks[0].stats.summary() if arm not in ("uniform", "uniform_subset") else {}
    return {"arm": arm, "seed": seed, "loaded_batch": load * b, "epochs": epochs, "steps": last["steps"],
            "base_rate": base, "final_acc": val[-1], "best_acc": max(val), "wall_s": last["wall_s"],
            "step_s": last["step_s"], "ms_per_step": 1000 * last["step_s"] / last["steps"],
            "fit_total_s": round(total, 3), "trained_rows_per_step": trained_rows / last["steps"],
            "mislabelled_row_ratio": row_ratio, "mislabelled_weight_ratio": weighted_ratio,
            "policy_totals": summary, "records": recorder.records}


def ohem_cost(repeats: int = 5, steps: int = 40, hidden: int = 2048, loaded: int = 1024) -> dict[str, Any]:
    """ms per training step of OHEM's two modes (and of plain training on the loaded and on the kept batch) on a
    wide MLP: the median of ``steps`` steps (timed between batch start and end, after 5 warm-up steps) per repeat;
    the variants are interleaved within each repeat, so a change of machine load hits them alike."""
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)

    variants = {"plain_loaded": (loaded, None), "plain_kept": (loaded // 4, None),
                "ohem_select": (loaded, "select"), "ohem_weight": (loaded, "weight")}
    per_repeat: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, (batch, mode) in variants.items():
            pl.seed_everything(r, verbose=False)
            timer = StepTimer()
            model = NoisyLabelClassifier(arch="mlp", hidden=hidden, plain_loss=mode is None)  # plain: no engine
            pols = [] if mode is None else [OHEM(keep=0.25, mode=mode)]
            pl.Trainer(accelerator="cpu", max_steps=steps + 5, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                       callbacks=[*pols, timer]).fit(model, NoisyDigitsDataModule(batch_size=batch, seed=r))
            per_repeat[name].append(1000 * statistics.median(timer.times[5:]))
    out: dict[str, Any] = {"hidden": hidden, "loaded_batch": loaded, "keep": 0.25, "steps": steps, "repeats": repeats}
    for name, values in per_repeat.items():
        out[name] = {"ms_per_step": statistics.median(values), "min_ms_per_step": min(values), "per_repeat": values}
    return out


def table(runs: list[dict[str, Any]], noise: str) -> str:
    base = statistics.mean(r["base_rate"] for r in runs)
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"Noise rate {noise} (base rate of mislabelled training rows {base:.3f}); mean ± std over seeds "
             f"{', '.join(map(str, seeds))}; every arm has the uniform arm's optimizer steps.", "",
             "| arm | loaded / trained per step | final clean acc | best clean acc | wall (s) | ms per step "
             "| mislabelled share of trained rows / base | share of total weight on mislabelled / base |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        per_step = f"{rows[0]['loaded_batch']} / {_ms([r['trained_rows_per_step'] for r in rows], '{:.0f}')}"
        lines.append("| " + " | ".join([
            f"`{arm}`", per_step, _ms([r["final_acc"] for r in rows]), _ms([r["best_acc"] for r in rows]),
            _ms([r["wall_s"] for r in rows], "{:.2f}"), _ms([r["ms_per_step"] for r in rows], "{:.2f}"),
            _ms([r["mislabelled_row_ratio"] for r in rows], "{:.2f}"),
            _ms([r["mislabelled_weight_ratio"] for r in rows], "{:.2f}")]) + " |")
    return "\n".join(lines)


def write_markdown(payload: dict[str, Any], path: Path) -> None:
    parts = ["# Hard-example weighting against uniform training on label noise", "",
             "Generated by `benchmarks/weighting_noisy.py` (see its docstring for the arms). Machine: "
             f"{payload['machine']['platform']}, {payload['machine']['cpu_count']} CPU cores (shared), 1 torch "
             "thread. *wall*: seconds since fit start, validation excluded; *ms per step*: time inside training "
             "steps / optimizer steps. For `ohem_weight` the trained rows are those with weight 1 (every loaded "
             "row is forwarded and back-propagated).", ""]
    for noise, block in sorted(payload["noise_rates"].items()):
        parts += [f"## Noise: {noise}", "", "Reproduce: `" + block["command"] + "`", "",
                  table(block["runs"], noise), ""]
    cost = payload.get("ohem_cost")
    if cost:
        parts += ["## OHEM's two modes: cost per step", "",
                  f"MLP hidden {cost['hidden']}, loaded batch {cost['loaded_batch']}, keep {cost['keep']} "
                  f"(⌈0.25·{cost['loaded_batch']}⌉ = {cost['loaded_batch'] // 4} trained); per repeat the median of "
                  f"{cost['steps']} steps, variants interleaved; {cost['repeats']} repeats. Reproduce: "
                  f"`{cost['command']}`.", "",
                  "| variant | ms per step (median of repeats) | fastest repeat |", "|---|---|---|"]
        for name in ("plain_loaded", "plain_kept", "ohem_select", "ohem_weight"):
            parts.append(f"| `{name}` | {cost[name]['ms_per_step']:.2f} | {cost[name]['min_ms_per_step']:.2f} |")
        parts.append("")
    path.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--noise-rate", type=float, default=0.3)
    parser.add_argument("--dataset", choices=("digits", "cifar10n"), default="digits")
    parser.add_argument("--label-set", default="worse", help="cifar10n: the CIFAR-10N label set (its noise)")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="cifar10n: decoded-image cache folder")
    parser.add_argument("--epochs", type=int, default=None, help="uniform's epochs (default: the harness's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the harness's")
    parser.add_argument("--cost", action="store_true", help="also time OHEM's two modes on a wide MLP")
    parser.add_argument("--cost-only", action="store_true", help="only the OHEM timing (keeps the runs in the JSON)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.epochs = args.epochs or DATASET_DEFAULTS[args.dataset]["epochs"]
    args.batch_size = args.batch_size or DATASET_DEFAULTS[args.dataset]["batch_size"]
    torch.set_num_threads(args.threads)
    command = "python benchmarks/weighting_noisy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    name = "digits" if args.dataset == "digits" else f"cifar10n_{args.label_set}"
    out, md = args.out_dir / f"weighting_noisy_{name}.json", args.out_dir / f"weighting_noisy_{name}.md"
    noise_key = str(args.noise_rate) if args.dataset == "digits" else args.label_set
    payload = json.loads(out.read_text()) if out.is_file() else {"noise_rates": {}}
    payload["machine"] = machine_info(args.threads)
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in [] if args.cost_only else args.seeds:
        uniform_steps = None
        for arm in ["uniform"] + [a for a in args.arms if a != "uniform"]:
            t = time.perf_counter()
            run = run_one(args, arm, seed, uniform_steps)
            uniform_steps = run["steps"] if arm == "uniform" else uniform_steps
            runs.append(run)
            print(f"[{name} {noise_key} seed {seed}] {arm:15s} {time.perf_counter() - t:6.1f}s steps {run['steps']} "
                  f"acc {run['final_acc']:.4f} (best {run['best_acc']:.4f}) wall {run['wall_s']:.2f}s "
                  f"rows/base {run['mislabelled_row_ratio']:.2f} weight/base {run['mislabelled_weight_ratio']:.2f}",
                  flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if runs:
        payload["noise_rates"][noise_key] = {"command": command, "runs": runs,
                                                        "total_s": round(time.perf_counter() - start, 1)}
        out.write_text(json.dumps(payload, indent=1))
        write_markdown(payload, md)
        print(table(runs, noise_key))
    if args.cost or args.cost_only:
        payload["ohem_cost"] = {**ohem_cost(), "command": command}
        print(json.dumps({k: v for k, v in payload["ohem_cost"].items() if isinstance(v, dict)}, indent=1))
        out.write_text(json.dumps(payload, indent=1))
        write_markdown(payload, md)


if __name__ == "__main__":
    main()
