"""Learning-rate schedules to the validation plateau: constant, cosine and plateau on a seeded sample of
users of a SASRec-format file, with the settings chosen from the whole file's statistics.

    PYTHONPATH=src python -m benchmarks.bench_lr_schedule [--data games.txt] [--users 6000]
        [--schedules constant cosine plateau]

Each run: validation on every sampled user every 2 epochs, stop after 4 validations without a better
NDCG@10 (at most 40 epochs), then the leave-one-out test on every sampled user. One thread; prints one
JSON line per schedule (best epoch, where it stopped, validation and test metrics, CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.defaults import DataStats, choose
from shopsight.training.next_item.evaluate import evaluate_next_item, scorer
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LR_SCHEDULES, LoopConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/sasrec/games.txt")
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--schedules", nargs="+", choices=LR_SCHEDULES, default=list(LR_SCHEDULES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = SequenceData.from_file(args.data)
    keep = np.sort(np.random.default_rng(0).choice(len(data.sequences), args.users, replace=False))
    sample = SequenceData([data.sequences[i] for i in keep], data.user_ids[keep], data.item_ids)
    split = LeaveOneOut.split(sample)
    choice = choose(DataStats.of(data), "sasrec")  # the whole file's choice, as `shopsight train` makes it
    print(json.dumps({"users": args.users, **choice.values}), flush=True)
    for schedule in args.schedules:
        torch.manual_seed(0)
        model = build_model("sasrec", n_items=sample.n_items, **choice.values)
        cfg = LoopConfig(epochs=40, eval_every=2, patience=8, lr_schedule=schedule, eval_users=None, seed=0)
        cpu = time.process_time()
        history = train_next_item(model, split, cfg, log=lambda _: None)
        test = evaluate_next_item(scorer(model.eval()), split, "test", choice.values["max_len"], seed=0)
        best = max((h for h in history if h.valid), key=lambda h: h.valid["ndcg@10"])
        row = {
            "schedule": schedule,
            "best_epoch": best.epoch,
            "stopped": history[-1].epoch,
            "valid_ndcg@10": round(best.valid["ndcg@10"], 4),
            "test_hr@10": round(test["hr@10"], 4),
            "test_ndcg@10": round(test["ndcg@10"], 4),
            "cpu_s_to_best": round(best.cpu_seconds, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
