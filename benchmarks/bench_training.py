"""Training speed: the plain loop against the same loop under Ray Train, side by side in one run.

SASRec on a SASRec-format file (default ``../shared/data/sasrec/games.txt``), the same seed and
configuration three ways, each thread-limited to one core per worker:

1. the plain loop in this process (1 thread);
2. Ray Train's ``TorchTrainer`` with 1 worker (1 thread): the overhead of Ray (target at most 5%);
3. Ray Train with 2 workers (DDP over gloo, 1 thread each): the scaling on this machine's CPUs.

Samples/s are the steady-state epochs (the first is left out: it pays for start-up), and the wall time
of the whole run, start-up included, is reported beside them; seconds per epoch are of the full file.

    python -m benchmarks.bench_training [--data games.txt] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sasrec" / "games.txt"


def _steady(values: list[float]) -> float:
    return float(np.mean(values[1:] if len(values) > 1 else values))


def plain(data: Path, epochs: int, loop) -> dict:
    from shopsight.training.models import build_model
    from shopsight.training.next_item.data import LeaveOneOut, SequenceData
    from shopsight.training.next_item.fit import train_next_item

    started = time.perf_counter()
    torch.set_num_threads(1)
    split = LeaveOneOut.split(SequenceData.from_file(data))
    torch.manual_seed(loop.seed)
    model = build_model("sasrec", n_items=split.n_items)
    history = train_next_item(model, split, loop, log=lambda line: print("  plain", line, flush=True))
    return {
        "samples_per_second": _steady([h.samples_per_second for h in history]),
        "seconds_per_epoch": _steady([h.seconds for h in history]),
        "wall_seconds": time.perf_counter() - started,
        "epochs": len(history),
    }


def with_ray(data: Path, epochs: int, loop, workers: int) -> dict:
    from shopsight.training.next_item.fit import setup
    from shopsight.training.runtime.ray_train import fit_worker, train_with_ray

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        result = train_with_ray(
            fit_worker(setup),
            {"model": "sasrec", "model_config": {}, "data": data},
            metric="ndcg@10",
            name=f"bench-{workers}",
            storage_path=storage,
            workers=workers,
            loop=loop,
        )
        frame = result.metrics_dataframe
    return {
        "samples_per_second": _steady(frame["samples_per_second"].tolist()),
        "seconds_per_epoch": _steady(frame["epoch_seconds"].tolist()),
        "wall_seconds": time.perf_counter() - started,
        "epochs": len(frame),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: pass --data (a SASRec-format 'user item' file)")
    import ray

    from shopsight.training.runtime.loop import LoopConfig

    # validation only at the end: the comparison is of training steps
    loop = LoopConfig(epochs=args.epochs, eval_every=10**6, eval_users=1000)
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = {"plain loop, 1 process": plain(args.data, args.epochs, loop)}
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        rows["Ray Train, 1 worker"] = with_ray(args.data, args.epochs, loop, 1)
        rows["Ray Train, 2 workers (gloo)"] = with_ray(args.data, args.epochs, loop, 2)
    finally:
        ray.shutdown()
    base = rows["plain loop, 1 process"]["samples_per_second"]
    one = rows["Ray Train, 1 worker"]["samples_per_second"]
    result = {"machine": describe_machine(), "data": str(args.data), "rows": rows,
              "ray_overhead": 1 - one / base}  # fmt: skip
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_speed.json").write_text(json.dumps(result, indent=2))
    machine = result["machine"]
    lines = [
        f"## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}",
        "",
        f"SASRec (d=50, 2 blocks, batch 128, BCE) on `{args.data.name}`, {args.epochs} epochs each, 1 thread "
        "per worker; samples/s and s/epoch are steady-state epochs (the first is left out).",
        "",
        "| run | samples/s | vs plain | s/epoch | wall s (incl. start-up) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['samples_per_second']:,.0f} | {r['samples_per_second'] / base:.3f}x "
            f"| {r['seconds_per_epoch']:.1f} | {r['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Ray Train overhead with 1 worker: {100 * (1 - one / base):.1f}% of throughput (target at most 5%).",
    ]
    append_report(
        RESULTS / "training_speed.md",
        "Training speed: plain loop vs Ray Train",
        "python -m benchmarks.bench_training",
        lines,
    )


if __name__ == "__main__":
    main()
