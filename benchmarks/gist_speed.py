"""Per-step speed of GIST, measured in one run against its baselines on identical data.

Part A, "live guide" (the configuration sentence-transformers measured: MiniLM-L6 as both student
and guide): sentence-transformers' MultipleNegativesRankingLoss and GISTEmbedLoss in a plain
PyTorch loop, against lightning_select's MNRL and GuidedNegatives (cache off) in a Lightning
Trainer. Same pairs (SICK, relatedness ≥ 4), same batch size, same τ, AdamW.

Part B, "warm cache" with the tiny static student: plain MNRL against GuidedNegatives with a
precomputed (warm) guide cache, both in a Lightning Trainer.

Step time = wall time per optimizer step (forward, guide, loss, backward, optimizer), median
over the measured steps after warm-up; arms are interleaved over rounds (part B: one unrecorded
warm-up round, then 2×rounds measured rounds in alternating order, 120 steps each).

    python benchmarks/gist_speed.py     # writes benchmarks/results/gist_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_select import GuidedNegatives, SelectionEngine, load_guide  # noqa: E402
from lightning_select.data import SickDataModule  # noqa: E402
from lightning_select.guides.encoders import minilm_guide_path  # noqa: E402
from lightning_select.models import HFTransformerEncoder, TextEmbeddingModule  # noqa: E402

from common import StepTimer  # noqa: E402


def batches(data_dir: str, batch_size: int, steps: int) -> list[dict]:
    dm = SickDataModule(data_dir=data_dir, batch_size=batch_size, seed=0)
    dm.setup("fit")
    out = []
    for b in dm.train_dataloader():
        out.append(b)
        if len(out) == steps:
            return out
    raise RuntimeError("not enough training batches")


def st_arm(kind: str, data: list[dict], temperature: float, warmup: int) -> list[float]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MultipleNegativesRankingLoss

    torch.manual_seed(0)
    student = SentenceTransformer(minilm_guide_path(), device="cpu")
    if kind == "st_gist":
        guide = SentenceTransformer(minilm_guide_path(), device="cpu")
        loss_fn = GISTEmbedLoss(student, guide, temperature=temperature)
    else:
        loss_fn = MultipleNegativesRankingLoss(student, scale=1.0 / temperature)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-5)
    student.train()
    times = []
    for batch in data:
        t0 = time.perf_counter()
        features = [student.tokenize(batch["anchor"]), student.tokenize(batch["positive"])]
        loss = loss_fn(features, None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


class ListData(pl.LightningDataModule):
    def __init__(self, data: list[dict]) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self):
        return self.data


def ours_arm(kind: str, temperature: float, warmup: int, data_dir: str, data: list[dict] | None = None,
             steps: int = 0, batch_size: int = 64) -> list[float]:
    """lightning_select in a Trainer. With ``data`` (live-guide part): MiniLM student on those exact
    batches. Without: the tiny static student on SICK batches from the datamodule."""
    torch.manual_seed(0)
    if data is not None:
        model = TextEmbeddingModule(encoder=HFTransformerEncoder(minilm_guide_path(), local_files_only=True),
                                    temperature=temperature, lr=2e-5)
        steps = len(data)
    else:
        model = TextEmbeddingModule(student_path=os.path.join(data_dir, "models", "minilm-l6-m2v-128d"),
                                    temperature=temperature)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [SelectionEngine(), timer]
    if kind == "ours_gist_live":
        callbacks.append(GuidedNegatives(load_guide("minilm"), "anchor", "positive", cache=None))
    elif kind == "ours_gist_warm_cache":
        callbacks.append(GuidedNegatives(load_guide("minilm"), "anchor", "positive", cache="memory", precompute=True))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         limit_val_batches=0)
    if data is not None:
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    else:
        trainer.fit(model, datamodule=SickDataModule(data_dir=data_dir, batch_size=batch_size, seed=0))
    return timer.times[warmup:]


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(1e3 * statistics.median(v), 3) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--static-batch-size", type=int, default=64)
    parser.add_argument("--static-steps", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gist_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    data = batches(args.data_dir, args.batch_size, args.steps)
    live: dict[str, list[float]] = {k: [] for k in ("st_mnrl", "st_gist", "ours_mnrl", "ours_gist_live")}
    for r in range(args.rounds):
        for kind in live:
            if kind.startswith("st_"):
                live[kind] += st_arm(kind, data, args.temperature, args.warmup)
            else:
                live[kind] += ours_arm(kind, args.temperature, args.warmup, args.data_dir, data=data)
            print(f"round {r + 1} {kind}: median {1e3 * statistics.median(live[kind]):.1f} ms", flush=True)

    # Part B: small steps are sensitive to process warm-up, so one unrecorded warm-up round per arm
    # comes first and the measured rounds alternate the arms' order.
    warm: dict[str, list[float]] = {"ours_mnrl_static": [], "ours_gist_warm_cache": []}
    for r in range(args.rounds * 2 + 1):
        for kind in (list(warm) if r % 2 == 0 else list(warm)[::-1]):
            times = ours_arm(kind, args.temperature, args.warmup, args.data_dir, steps=args.static_steps,
                             batch_size=args.static_batch_size)
            if r > 0:
                warm[kind] += times
            print(f"round {r} {kind}: median {1e3 * statistics.median(times):.2f} ms" + (" (warm-up)" if r == 0 else ""),
                  flush=True)

    ms = {**summarise(live), **summarise(warm)}
    result = {
        "benchmark": "gist_speed",
        "command": "python benchmarks/gist_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "data_dir")),
        "torch": torch.__version__, "threads": 2,
        "median_step_ms": ms,
        "ratios": {
            "ours_gist_live / st_gist": round(ms["ours_gist_live"] / ms["st_gist"], 3),
            "st_gist / st_mnrl": round(ms["st_gist"] / ms["st_mnrl"], 3),
            "ours_gist_live / ours_mnrl": round(ms["ours_gist_live"] / ms["ours_mnrl"], 3),
            "ours_mnrl / st_mnrl": round(ms["ours_mnrl"] / ms["st_mnrl"], 3),
            "ours_gist_warm_cache / ours_mnrl_static": round(ms["ours_gist_warm_cache"] / ms["ours_mnrl_static"], 3),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
