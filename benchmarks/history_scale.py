"""How the per-sample loss history (``SampleLossStore``) scales to 10 million samples, and when to shard it.

Measures, on CPU, for each N in ``--sizes``:

1. memory: ``bytes_per_sample()`` and the RSS growth (``VmRSS``; peak from ``VmHWM``, reset through
   ``/proc/self/clear_refs``) of allocating the store, each in a fresh process: default fields, with
   ``trace_epochs=10`` and with 2 summed statistics;
2. update cost per training step, for each batch B in ``--batches``: ``update_many`` of 32 buffered
   steps (LossHistory's ``flush_every``) with indices drawn without replacement (an epoch's
   permutation: the single vectorised path) and i.i.d. with replacement (repeats across the 32 steps
   fall back to one update per step), and one ``update`` per step (``flush_every=1``); fresh random
   indices every repeat, the first repeat discarded as warm-up;
3. (unless ``--skip-ddp``) the per-step gather under 2-process CPU DDP (gloo, plain
   ``torch.distributed``, no Lightning): ``all_gather`` + stack of a float64 ``[B, 3]`` and ``[B, 5]``
   tensor, as the engine's ``_gather_rows`` does; it does not depend on N;
4. checkpoint: ``state_dict()`` + ``torch.save`` size and time, ``torch.load`` time, at the largest N;
5. export: ``export('*.parquet')`` time and size at the largest N.

The store for 4 and 5 is filled as after one epoch (random losses, every sample seen once). Results
(with machine info, the load average and the command) go to ``benchmarks/results/history_scale.json``,
rewritten after every measurement, together with the extrapolation to 1e8 samples and the N above
which a replicated table on a 64 GB node with 8 ranks would exceed 10% of its memory.

    .venv/bin/python benchmarks/history_scale.py --sizes 1e6 1e7 --batches 256 4096 --repeats 7
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "history_scale.json"
STEPS_PER_FLUSH = 32  # LossHistory(flush_every=32)
EXTRAPOLATE_N = 10**8
NODE_RAM_BYTES, RANKS, BUDGET_FRACTION = 64e9, 8, 0.10  # a 64 GB node, 8 replicas, 10% of its memory
CONFIGS = ("default", "trace10", "stats2")


def memory_status() -> dict[str, int]:
    """Current and peak resident set size of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def make_store(n: int, config: str = "default"):
    from lightning_select.stats.history import SampleLossStore

    store = SampleLossStore(n, trace_epochs=10 if config == "trace10" else 0)
    if config == "stats2":  # declares stat_a and stat_b the way LossHistory does, through update()
        empty = torch.zeros(0)
        store.update(torch.zeros(0, dtype=torch.long), empty, 0, 0, {"a": empty, "b": empty})
    return store


def memory_child(n: int, config: str) -> None:
    """Runs in a fresh process: RSS growth of allocating one store (printed as JSON)."""
    make_store(1000, config)  # imports and first-allocation overheads out of the way
    gc.collect()
    reset_peak()
    before = memory_status()["VmRSS"]
    start = time.perf_counter()
    store = make_store(n, config)
    seconds = time.perf_counter() - start
    after = memory_status()
    print(json.dumps({
        "bytes_per_sample": store.bytes_per_sample(),
        "bytes_per_sample_with_optional": store.table.bytes_per_sample(include_traces=True),
        "rss_growth_bytes": after["VmRSS"] - before, "peak_growth_bytes": after["VmHWM"] - before,
        "rss_bytes_per_sample": (after["VmRSS"] - before) / n, "peak_bytes_per_sample": (after["VmHWM"] - before) / n,
        "allocate_s": seconds,
    }))


def measure_memory(n: int, config: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(n), config, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_updates(n: int, batch: int, repeats: int, seed: int = 0) -> dict:
    """Microseconds per training step of the three update paths (median over repeats)."""
    store = make_store(n)
    gen = torch.Generator().manual_seed(seed)
    total = STEPS_PER_FLUSH * batch

    def observations(iid: bool) -> tuple[list, bool]:
        idx = torch.randint(n, (total,), generator=gen) if iid else torch.randperm(n, generator=gen)[:total]
        obs = [(chunk, torch.rand(batch, generator=gen), step, 0, {}) for step, chunk in enumerate(idx.split(batch))]
        return obs, idx.unique().numel() < total

    paths = {"update_many_permutation": (False, store.update_many),
             "update_many_iid": (True, store.update_many),
             "update_per_step": (False, lambda obs: [store.update(*o) for o in obs])}
    out = {}
    for name, (iid, apply) in paths.items():
        times, repeated = [], 0
        for r in range(repeats + 1):
            obs, has_repeats = observations(iid)
            start = time.perf_counter()
            apply(obs)
            if r:  # the first repeat is a warm-up
                times.append((time.perf_counter() - start) / STEPS_PER_FLUSH * 1e6)
                repeated += has_repeats
        out[name] = {"median_us_per_step": statistics.median(times), "us_per_step": [round(t, 1) for t in times],
                     "repeats_with_repeated_indices": repeated}
    return out


def _gather_worker(rank: int, world: int, port: int, batches: list[int], widths: list[int], steps: int,
                   warmup: int, threads: int, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    medians = {}
    for batch in batches:
        for width in widths:
            rows = torch.rand(batch, width, dtype=torch.float64)
            times = []
            dist.barrier()
            for i in range(warmup + steps):
                start = time.perf_counter()
                parts = [torch.empty_like(rows) for _ in range(world)]  # as Lightning's all_gather does
                dist.all_gather(parts, rows)
                torch.stack(parts).reshape(-1, width)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            medians[f"B{batch}_w{width}"] = statistics.median(times) * 1e6
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, medians)
    if rank == 0:
        Path(out_path).write_text(json.dumps(per_rank))
    dist.destroy_process_group()


def measure_gather(batches: list[int], threads: int, steps: int = 200, warmup: int = 20) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    widths = [3, 5]  # index, loss, weight (+ 2 summed statistics)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "gather.json")
        mp.spawn(_gather_worker, args=(2, port, batches, widths, steps, warmup, threads, out_path), nprocs=2)
        per_rank = json.loads(Path(out_path).read_text())
    return {key: {"median_us_rank0": per_rank[0][key], "median_us_rank1": per_rank[1][key],
                  "median_us_slowest_rank": max(r[key] for r in per_rank),
                  "bytes_per_rank": int(key.split("_w")[0][1:]) * int(key.split("_w")[1]) * 8}
            for key in per_rank[0]} | {"world_size": 2, "backend": "gloo", "steps": steps, "warmup": warmup}


def fill_one_epoch(store, batch: int = 256) -> None:
    """Every sample seen once at a random step of epoch 0, with a random loss (realistic, incompressible)."""
    gen = torch.Generator().manual_seed(0)
    n = store.num_samples
    loss = torch.rand(n, generator=gen) * 5
    step = (torch.randperm(n, generator=gen) // batch).int()
    for name, value in (("last_loss", loss), ("ema_loss", loss), ("count", 1), ("first_step", step),
                        ("last_step", step), ("first_epoch", 0), ("last_epoch", 0)):
        getattr(store, name).copy_(torch.as_tensor(value))


def measure_checkpoint_and_export(n: int) -> tuple[dict, dict]:
    store = make_store(n)
    fill_one_epoch(store)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.pt"
        gc.collect()
        reset_peak()
        before = memory_status()["VmRSS"]
        start = time.perf_counter()
        state = store.state_dict()
        state_s = time.perf_counter() - start
        torch.save(state, path)
        save_s = time.perf_counter() - start - state_s
        peak = memory_status()["VmHWM"] - before
        del state
        start = time.perf_counter()
        torch.load(path)
        load_s = time.perf_counter() - start
        size = path.stat().st_size
        checkpoint = {"n": n, "file_bytes": size, "file_mb": size / 1e6, "file_bytes_per_sample": size / n,
                      "state_dict_s": state_s, "save_s": save_s, "state_dict_plus_save_s": state_s + save_s,
                      "load_s": load_s, "peak_rss_growth_bytes": peak, "peak_rss_growth_bytes_per_sample": peak / n,
                      "note": "torch.save to a local file, no fsync (page cache)"}
        path.unlink()
        make_store(10).export(Path(tmp) / "warm.parquet")  # pandas/pyarrow imports out of the measurement
        gc.collect()
        reset_peak()
        before = memory_status()["VmRSS"]
        start = time.perf_counter()
        written = store.export(Path(tmp) / "history.parquet")
        seconds = time.perf_counter() - start
        peak = memory_status()["VmHWM"] - before
        export = {"n": n, "export_s": seconds, "file_bytes": written.stat().st_size,
                  "file_mb": written.stat().st_size / 1e6, "peak_rss_growth_bytes": peak,
                  "peak_rss_growth_bytes_per_sample": peak / n}
    return checkpoint, export


def extrapolate(results: dict) -> dict:
    """Replicated-table memory at 1e8 samples and the N above which 8 replicas exceed 10% of a 64 GB node."""
    largest = str(max(int(n) for n in results["memory"]))
    budget = BUDGET_FRACTION * NODE_RAM_BYTES
    out = {"n": EXTRAPOLATE_N, "node_ram_bytes": NODE_RAM_BYTES, "ranks": RANKS, "budget_fraction": BUDGET_FRACTION,
           "from_n": int(largest), "configs": {}}

    def row(bytes_per_sample: float) -> dict:
        return {"bytes_per_sample": round(bytes_per_sample, 2),
                "per_rank_gb_at_1e8": bytes_per_sample * EXTRAPOLATE_N / 1e9,
                "node_gb_at_1e8": RANKS * bytes_per_sample * EXTRAPOLATE_N / 1e9,
                "node_fraction_at_1e8": RANKS * bytes_per_sample * EXTRAPOLATE_N / NODE_RAM_BYTES,
                "shard_above_n": budget / (RANKS * bytes_per_sample)}

    for config, measured in results["memory"][largest].items():
        out["configs"][config] = row(measured["rss_bytes_per_sample"])
    if "checkpoint" in results:  # state_dict() runs on every rank: the clones coexist with the table
        steady = results["memory"][largest]["default"]["rss_bytes_per_sample"]
        out["configs"]["default_during_checkpoint"] = row(
            steady + results["checkpoint"]["peak_rss_growth_bytes_per_sample"])
        out["checkpoint_gb_at_1e8"] = results["checkpoint"]["file_bytes_per_sample"] * EXTRAPOLATE_N / 1e9
    return out


def machine_info(threads: int) -> dict:
    import pandas
    import pyarrow

    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "cpu_model": model.group(1) if model else None, "ram_bytes": int(mem.group(1)) * 1024 if mem else None,
            "torch": torch.__version__, "torch_threads": threads, "python": platform.python_version(),
            "pandas": pandas.__version__, "pyarrow": pyarrow.__version__, "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7], help="numbers of samples N")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096], help="per-step batch sizes B")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each update measurement")
    parser.add_argument("--skip-ddp", action="store_true", help="skip the 2-process gloo gather")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a small shared machine 2 threads stall in OpenMP barriers)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", nargs=2, metavar=("N", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    sizes = sorted(int(n) for n in args.sizes)
    results: dict = {"command": " ".join([".venv/bin/python", "benchmarks/history_scale.py", *sys.argv[1:]]),
                     "machine": machine_info(args.threads), "memory": {}, "update": {}}

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        results["machine"]["loadavg_now"] = os.getloadavg()
        args.output.write_text(json.dumps(results, indent=2) + "\n")

    for n in sizes:
        results["memory"][str(n)] = {}
        for config in CONFIGS:
            m = results["memory"][str(n)][config] = measure_memory(n, config, args.threads)
            print(f"memory   N={n:.0e} {config:8s} {m['bytes_per_sample_with_optional']:.0f} B/sample nominal, "
                  f"RSS +{m['rss_growth_bytes'] / 1e6:.1f} MB ({m['rss_bytes_per_sample']:.2f} B/sample), "
                  f"peak +{m['peak_growth_bytes'] / 1e6:.1f} MB, {m['allocate_s']:.2f} s", flush=True)
            save()
    for n in sizes:
        for batch in args.batches:
            u = results["update"][f"N{n}_B{batch}"] = time_updates(n, batch, args.repeats)
            print(f"update   N={n:.0e} B={batch:5d} " + ", ".join(
                f"{k} {v['median_us_per_step']:.0f} us/step" for k, v in u.items()), flush=True)
            save()
    if not args.skip_ddp:
        g = results["gather"] = measure_gather(args.batches, args.threads)
        print("gather   " + ", ".join(f"{k} {v['median_us_slowest_rank']:.0f} us" for k, v in g.items()
                                      if isinstance(v, dict)), flush=True)
        save()
    results["checkpoint"], results["export"] = measure_checkpoint_and_export(sizes[-1])
    c, e = results["checkpoint"], results["export"]
    print(f"ckpt     N={sizes[-1]:.0e} {c['file_mb']:.0f} MB, state_dict {c['state_dict_s']:.2f} s + save "
          f"{c['save_s']:.2f} s, load {c['load_s']:.2f} s, peak RSS +{c['peak_rss_growth_bytes'] / 1e6:.0f} MB", flush=True)
    print(f"export   N={sizes[-1]:.0e} parquet {e['file_mb']:.0f} MB in {e['export_s']:.2f} s, "
          f"peak RSS +{e['peak_rss_growth_bytes'] / 1e6:.0f} MB", flush=True)
    results["extrapolation"] = extrapolate(results)
    for config, r in results["extrapolation"]["configs"].items():
        print(f"1e8      {config:26s} {r['bytes_per_sample']:6.2f} B/sample: {r['per_rank_gb_at_1e8']:.1f} GB/rank, "
              f"{r['node_gb_at_1e8']:.1f} GB on {RANKS} ranks ({r['node_fraction_at_1e8']:.0%} of 64 GB); "
              f"shard above N={r['shard_above_n']:.3g}", flush=True)
    save()


if __name__ == "__main__":
    main()
