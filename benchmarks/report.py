"""Render the benchmark result files in benchmarks/results/ as the Markdown tables used in README.md,
and (with ``--plots``) the figures next to them.

    python benchmarks/report.py            # tables
    python benchmarks/report.py --plots    # + benchmarks/results/gist_digits_margin.png, gist_quality_arms.png
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pm(cell: dict, digits: int = 4) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def overhead(r: dict) -> str:
    rows = ["| batch × hidden | plain step | engine + history step | ratio |", "|---|---|---|---|"]
    for c in r["configs"]:
        ms = c["median_step_ms"]
        rows.append(f"| {c['batch_size']} × {c['hidden']} | {ms['plain']:.3f} ms | {ms['engine+history']:.3f} ms "
                    f"| {c['step_time_ratio']:.3f}× |")
    return "\n".join(rows) + f"\n\nReproduce: `{r['command']}`"


def gist_digits(r: dict) -> str:
    rows = ["| arm | precision@1 | MAP | nDCG@10 |", "|---|---|---|---|"]
    for arm, m in r["results"].items():
        rows.append(f"| {arm} | {pm(m['precision@1'])} | {pm(m['map'])} | {pm(m['ndcg@10'])} |")
    return "\n".join(rows) + f"\n\n{len(r['seeds'])} seeds. Reproduce: `{r['command']}`"


def gist_quality(r: dict) -> str:
    out = []
    for dataset, arms in r["results"].items():
        rows = [f"**{dataset}** ({r['epochs'][dataset]} epoch(s))", "",
                "| arm | nDCG@10 | MRR@10 | Recall@1 | Recall@10 | STSb ρ | train s |", "|---|---|---|---|---|---|---|"]
        for arm, m in arms.items():
            rows.append(f"| {arm} | {pm(m['ndcg@10'])} | {pm(m['mrr@10'])} | {pm(m['recall@1'])} | "
                        f"{pm(m['recall@10'])} | {pm(m['stsb_spearman'])} | {m['train_seconds']['mean']:.1f} |")
        audits = {arm: m for arm, m in arms.items() if "fn_precision" in m}
        if audits:
            rows += ["", "| arm | guide-flag precision | recall | flagged share of AP candidates | gold share |",
                     "|---|---|---|---|---|"]
            for arm, m in audits.items():
                rows.append(f"| {arm} | {pm(m['fn_precision'], 3)} | {pm(m['fn_recall'], 3)} | "
                            f"{m['masked_fraction_ap']['mean']:.5f} | {m['gold_fraction_ap']['mean']:.5f} |")
        out.append("\n".join(rows))
    return "\n\n".join(out) + f"\n\nSeeds {r['seeds']}. Reproduce: `{r['command']}`"


def gist_speed(r: dict) -> str:
    rows = ["| arm | median step |", "|---|---|"]
    rows += [f"| {k} | {v:.1f} ms |" for k, v in r["median_step_ms"].items()]
    rows += ["", "| ratio | value |", "|---|---|"]
    rows += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    return "\n".join(rows) + f"\n\nReproduce: `{r['command']}`"


def gist_memory(r: dict) -> str:
    rows = ["| mode | peak RSS | s / step | first loss |", "|---|---|---|---|"]
    for name, m in r["modes"].items():
        rows.append(f"| {name} | {m['peak_rss_mb']:.0f} MB | {m['seconds_per_step']:.1f} | {m['first_loss']:.6f} |")
    return "\n".join(rows) + f"\n\nReproduce: `{r['command']}`"


def plot_gist_digits(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = r["results"]
    margins = sorted(float(k.split("_m")[1]) for k in res if k.startswith("gist_m"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("precision@1", "map")):
        ys = [res[f"gist_m{m}"][metric] for m in margins]
        ax.errorbar(margins, [y["mean"] for y in ys], yerr=[y["std"] for y in ys], marker="o", capsize=3,
                    label="GIST (blocks + filtering)")
        for arm, color, linestyle in (("mnrl", "k", "--"), ("blocks_only", "C2", ":"), ("filter_only", "C3", "-.")):
            ax.axhline(res[arm][metric]["mean"], color=color, linestyle=linestyle, label=arm)
        ax.set(xlabel="margin m (flag guide cosine > 1 − m)", ylabel=metric, title=f"digits held-out {metric}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gist_quality(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(r["results"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4))
    for ax, dataset in zip(axes if len(datasets) > 1 else [axes], datasets):
        arms = r["results"][dataset]
        base = arms["mnrl"]["ndcg@10"]["mean"]
        names = list(arms)
        ax.bar(range(len(names)), [arms[a]["ndcg@10"]["mean"] - base for a in names],
               yerr=[arms[a]["ndcg@10"]["std"] for a in names], capsize=3,
               color=["C0" if a.startswith("gist") else "C7" for a in names])
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="nDCG@10 − MNRL", title=f"{dataset}: held-out nDCG@10 relative to MNRL ({base:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import sys

    if "--plots" in sys.argv:
        for name, plot in (("gist_digits", plot_gist_digits), ("gist_quality", plot_gist_quality)):
            result = load(name)
            if result is not None:
                target = RESULTS / ("gist_digits_margin.png" if name == "gist_digits" else "gist_quality_arms.png")
                plot(result, target)
                print(f"wrote {target}")
    for name, render in (("overhead", overhead), ("gist_digits", gist_digits), ("gist_quality", gist_quality),
                         ("gist_speed", gist_speed), ("gist_memory", gist_memory)):
        result = load(name)
        if result is not None:
            print(f"### {name}\n\n{render(result)}\n")


if __name__ == "__main__":
    main()
