"""Hardness-weighted in-batch negatives on text, alone and after GIST's masking; mean ± std over seeds.

The harness of ``benchmarks/gist_quality.py`` (imported): the same Quora and SICK splits, the tiny static
student (minilm-l6-m2v-128d), τ = 0.05, batch 64, AdamW lr 2e-3, 5 epochs on SICK and 1 on Quora, the
MiniLM guide with its disk cache, held-out nDCG@10 / MRR@10 and STSb test Spearman.

Arms (α = ``--alpha``, default 9, the value Lan et al. use and the reference's docs give):
  mnrl                 plain in-batch InfoNCE (MNRL)
  mnrl_hardness        + HardnessWeightedNegatives(alpha=α)  (= sentence-transformers MNRL hardness_mode)
  gist                 GuidedNegatives (MiniLM guide, margin 0, AA/PP blocks)
  gist_hardness        GIST masks, then hardness weights what is left (AP only, the reference's blocks)
  extra arms: gist_hardness_blocks (same_type_blocks=True: AA/PP weighted too), and any of the hardness
  arms with ``_a<α>`` (e.g. ``mnrl_hardness_a1``) for another α.

Besides the metrics, each run records what the policies did over all its steps: GIST's masked share
of the in-batch negatives (AP, and AP+AA+PP), the hardness policy's weighted and masked shares of its
negatives, its mean bonus α·s (logit units) and mean equivalent weight exp(α·s), and a probe that
reads the final logits of every step: the mean softmax probability of the positive and the mean
probability mass on *gold* false negatives (AP candidates of the anchor's own cluster: the Quora
duplicate cluster, the exact same sentence on SICK), which is what hardness weighting up-weights and
GIST's masking removes.

    python benchmarks/hardness_text.py                                   # full size: both datasets, 3 seeds
    python benchmarks/hardness_text.py --datasets sick --seeds 0 --arms mnrl mnrl_hardness
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_select import GuidedNegatives, HardnessWeightedNegatives, SelectionEngine, SelectionPolicy  # noqa: E402
from lightning_select import load_guide  # noqa: E402
from lightning_select.data import load_stsb  # noqa: E402
from lightning_select.models import TextEmbeddingModule  # noqa: E402

from gist_quality import fit_and_evaluate, make_datamodule, seed_summary, text_parser  # noqa: E402  (shared)

ARMS = ["mnrl", "mnrl_hardness", "gist", "gist_hardness"]
ARM = re.compile(r"(?P<base>mnrl|gist)(?P<hardness>_hardness(?:_a(?P<alpha>\d+(?:\.\d+)?))?(?P<blocks>_blocks)?)?")
METRICS = [("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("stsb_spearman", "STSb ρ")]


class LogitProbe(SelectionPolicy):
    """Reads the final logits of every training step (after GIST and hardness: ``order`` 450): the mean
    probability of the positive and the mean probability mass on gold false negatives in AP."""

    order = 450
    needs_embeddings = True

    def __init__(self) -> None:
        self.steps, self.p_positive, self.fn_mass, self.fn_candidates, self.candidates = 0, 0.0, 0.0, 0, 0

    def edit_logits(self, ctx, logits) -> None:
        if ctx.phase != "train":
            return
        with torch.no_grad():
            prob = logits.logits().softmax(dim=1)
            rows = torch.arange(prob.shape[0])
            batch = ctx.sub_batch
            gold = batch["anchor_cluster"].view(-1, 1) == batch["positive_cluster"].view(1, -1)
            gold[rows, logits.target] = False
            ap = prob[:, : logits.block("ap").scores.shape[1]]
            self.p_positive += float(ap[rows, logits.target].mean())
            self.fn_mass += float((ap * gold).sum(1).mean())
            self.fn_candidates += int(gold.sum())
            self.candidates += gold.numel() - gold.shape[0]
            self.steps += 1

    def report(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"p_positive": self.p_positive / n, "gold_fn_mass": self.fn_mass / n,
                "gold_fn_share": self.fn_candidates / max(self.candidates, 1)}


class GistMaskAudit(pl.Callback):
    """GIST's masked share of the in-batch negatives over every step (own positive and self-pairs excluded)."""

    def __init__(self, gist: GuidedNegatives) -> None:
        self.gist, self.masked, self.total = gist, {"ap": 0, "all": 0}, {"ap": 0, "all": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.gist.last_masks.items():
            n = mask.numel() - mask.shape[0]
            for key in (("ap", "all") if name == "ap" else ("all",)):
                self.masked[key] += int(mask.sum())
                self.total[key] += n

    def report(self) -> dict[str, float]:
        return {"gist_masked_fraction_ap": self.masked["ap"] / max(self.total["ap"], 1),
                "gist_masked_fraction_all": self.masked["all"] / max(self.total["all"], 1)}


def run(dataset: str, arm: str, seed: int, args, guide, stsb) -> dict[str, float]:
    spec = ARM.fullmatch(arm)
    if spec is None:
        raise SystemExit(f"unknown arm {arm!r}; expected e.g. {ARMS} or gist_hardness_blocks, mnrl_hardness_a3")
    pl.seed_everything(seed)
    dm = make_datamodule(dataset, args.data_dir, 64, seed)
    model = TextEmbeddingModule(student_path=os.path.join(args.data_dir, "models", "minilm-l6-m2v-128d"),
                                temperature=0.05, lr=2e-3)
    probe = LogitProbe()
    callbacks: list[pl.Callback] = [SelectionEngine(), probe]
    hardness, audit = None, None
    if spec["hardness"]:
        alpha = float(spec["alpha"]) if spec["alpha"] else args.alpha
        hardness = HardnessWeightedNegatives(alpha=alpha, same_type_blocks=bool(spec["blocks"]))
        callbacks.append(hardness)  # before GIST in the list on purpose: `order` puts GIST's mask first
    if spec["base"] == "gist":
        gist = GuidedNegatives(guide, "anchor", "positive", cache="disk", cache_dir=str(Path(args.cache_dir) / dataset),
                               precompute=True)
        audit = GistMaskAudit(gist)
        callbacks += [gist, audit]
    metrics = fit_and_evaluate(model, dm, callbacks, args.epochs[dataset], stsb)
    metrics.update(probe.report())
    if audit is not None:
        metrics.update(audit.report())
    if hardness is not None:
        summary = hardness.summary()
        metrics.update({f"hardness_{k}": float(summary[k]) for k in
                        ("weighted_fraction", "masked_fraction", "bonus_mean", "bonus_std", "weight_mean")})
    return metrics


def markdown(out: dict) -> str:
    lines = ["# Hardness-weighted negatives on text", "",
             f"Seeds {out['seeds']}, epochs {out['epochs']}, α = {out['alpha']} unless the arm says `_a<α>`. "
             f"Reproduce: `{out['command']}`", ""]
    for dataset, arms in out["results"].items():
        lines += [f"## {dataset} ({out['epochs'][dataset]} epoch(s))", "",
                  "| arm | " + " | ".join(label for _, label in METRICS) + " | P(positive) | mass on gold FN | "
                  "GIST masked (AP) | weighted | bonus α·s | exp(α·s) | train s |",
                  "|---" * (len(METRICS) + 8) + "|"]
        for arm, r in arms.items():
            def cell(key, fmt="{:.4f}", std=True):
                if key not in r:
                    return "–"
                return fmt.format(r[key]["mean"]) + (f" ± {r[key]['std']:.4f}" if std else "")
            lines.append(f"| {arm} | " + " | ".join(cell(k) for k, _ in METRICS) + " | " + " | ".join([
                cell("p_positive", std=False), cell("gold_fn_mass", "{:.5f}", std=False),
                cell("gist_masked_fraction_ap", "{:.5f}", std=False),
                cell("hardness_weighted_fraction", "{:.5f}", std=False),
                cell("hardness_bonus_mean", "{:.3f}", std=False), cell("hardness_weight_mean", "{:.1f}", std=False),
                cell("train_seconds", "{:.1f}", std=False)]) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = text_parser(__doc__, "hardness_text", ["sick", "quora"])
    parser.add_argument("--arms", nargs="+", default=ARMS)
    parser.add_argument("--alpha", type=float, default=9.0)
    args = parser.parse_args()
    args.epochs = {"sick": args.sick_epochs, "quora": args.quora_epochs}
    torch.set_num_threads(2)
    guide = load_guide("minilm")
    stsb = load_stsb(args.data_dir, "test")
    results: dict = json.loads(args.out.read_text()).get("results", {}) if args.out.exists() else {}
    for dataset in args.datasets:
        for arm in args.arms:
            runs = [run(dataset, arm, s, args, guide, stsb) for s in args.seeds]
            summary = seed_summary(runs)
            results.setdefault(dataset, {})[arm] = summary
            print(f"{dataset:6s} {arm:22s} " + "  ".join(
                f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in summary.items()), flush=True)
            out = {"benchmark": "hardness_text", "command": "python benchmarks/hardness_text.py", "seeds": args.seeds,
                   "epochs": args.epochs, "alpha": args.alpha, "batch_size": 64, "temperature": 0.05,
                   "results": results}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(markdown(out) + "\n")


if __name__ == "__main__":
    main()
