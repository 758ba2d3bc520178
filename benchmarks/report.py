"""Render the benchmark result files in benchmarks/results/ as the Markdown tables used in README.md.

    python benchmarks/report.py
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


def main() -> None:
    for name, render in (("overhead", overhead), ("gist_digits", gist_digits), ("gist_quality", gist_quality),
                         ("gist_speed", gist_speed), ("gist_memory", gist_memory)):
        result = load(name)
        if result is not None:
            print(f"### {name}\n\n{render(result)}\n")


if __name__ == "__main__":
    main()
