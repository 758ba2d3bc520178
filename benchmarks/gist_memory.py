"""Peak memory of GIST's gradient-cached (chunked) mode against the plain mode at a large batch.

Each mode runs in its own process (peak RSS = ``ru_maxrss`` of that process, CPU): MiniLM-L6 as the
student, the MiniLM guide through a warm disk cache (shared with benchmarks/gist_quality.py, filled
on first use), SICK pairs, a few optimizer steps. The same process also records the loss of the
first step so the two modes can be compared.

    python benchmarks/gist_memory.py --batch-size 512 --mini-batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch

    from lightning_select import GuidedNegatives, SelectionEngine, load_guide
    from lightning_select.data import SickDataModule
    from lightning_select.guides.encoders import minilm_guide_path
    from lightning_select.models import HFTransformerEncoder, TextEmbeddingModule

    torch.set_num_threads(2)
    pl.seed_everything(0)
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = TextEmbeddingModule(encoder=HFTransformerEncoder(minilm_guide_path(), local_files_only=True), lr=2e-5)
    gist = GuidedNegatives(load_guide("minilm"), "anchor", "positive", cache="disk", precompute=True,
                           cache_dir=str(Path(args.cache_dir) / "sick"),
                           mini_batch_size=args.mini_batch_size or None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[SelectionEngine(), gist, Losses()])
    dm = SickDataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=0)
    start = time.perf_counter()
    trainer.fit(model, dm)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_fit_mb": base_rss / 1024, "first_loss": losses[0],
                      "seconds_per_step": (time.perf_counter() - start) / args.steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SELECT_DATA", "../shared/data"))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(Path(__file__).parent / ".cache"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gist_memory.json")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    modes = {}
    for name, mini in (("plain", 0), ("chunked", args.mini_batch_size)):
        cmd = [sys.executable, __file__, "--child", "--batch-size", str(args.batch_size), "--mini-batch-size",
               str(mini), "--steps", str(args.steps), "--data-dir", args.data_dir, "--cache-dir", args.cache_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        modes[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, modes[name], flush=True)
    result = {
        "benchmark": "gist_memory",
        "command": f"python benchmarks/gist_memory.py --batch-size {args.batch_size} "
                   f"--mini-batch-size {args.mini_batch_size} --steps {args.steps}",
        "student": "all-MiniLM-L6-v2 (6 layers, 22.7M params)", "device": "cpu, 2 threads",
        "modes": modes,
        "peak_rss_ratio_chunked_over_plain": round(modes["chunked"]["peak_rss_mb"] / modes["plain"]["peak_rss_mb"], 3),
        "first_loss_abs_diff": abs(modes["chunked"]["first_loss"] - modes["plain"]["first_loss"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
