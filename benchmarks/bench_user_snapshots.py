"""Quality of the tasks on user snapshots (purchase, churn) on simulator data, beside the simulator's oracle.

Simulates users, builds the features, applies the Feast repository and takes the point-in-time training
set of the task's feature service (all through the ``shopsight`` CLI, as a user would), then on the
task's time split (test on the last snapshot day, validate on the one before, train on the days whose
labels end before the validation day; docs/training.md) compares, on the same test rows:

- the oracle: the simulator's true probability of the label (the ceiling);
- gradient-boosted trees on the Feast activity features: unweighted, class-weighted, and with positives
  oversampled by the ``gan`` model (synthetic positive rows added to the training rows);
- ``sasrec`` with the task's head: unweighted, positive-weighted, and pretrained on next-item prediction
  (self-supervised on all behaviour before the validation day) then fine-tuned, weighted;
- ``lstm`` with the task's head, weighted;
- each network's probabilities calibrated on the validation day (what ``shopsight train`` registers and
  serves: isotonic or Platt, picked by cross-validation on that day), with the calibration error (ECE),
  the Brier score and the largest gap between the mean predicted probability and the observed rate over
  the test day's deciles beside the ranking metrics.

    python -m benchmarks.bench_user_snapshots [--task purchase|churn] [--users 4000]
        [--data-dir DIR (reuse a built one)]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"


def _cli(data_dir: Path, *args: str, last_day: date | None = None) -> None:
    # a simulation past the Taobao window (the data contract's default) widens the window to its last day
    window = ["--set", f"data.window_end={last_day}"] if last_day else []
    command = [sys.executable, "-m", "shopsight", "--data-dir", str(data_dir), *window, *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def prepare(data_dir: Path, users: int, days: int, burn_in: int, task) -> Path:
    """Simulated events -> features -> Feast -> training set (each step reused when already there).

    The first ``burn_in`` simulated days are history only: no snapshot is taken on them, so that every
    snapshot's windows (up to 7 days) are full and every user who is going to appear has appeared. Without
    them the first snapshot days hold only the users seen so far, mostly the active ones, and the label's
    rate climbs from day to day (churn_3d: 12% on the first day, 20% on the sixth).
    """
    out = data_dir / f"training_set_{task.name}.parquet"
    if out.exists():
        return out
    start = date(2017, 11, 25)
    events_end = start + timedelta(days=days - 1)
    first, last = start + timedelta(days=burn_in), events_end - timedelta(days=1)  # the last day: labels only
    if not (data_dir / "simulated" / "events").exists():
        _cli(data_dir, "data", "simulate", "--users", str(users), "--days", str(days))
    if not (data_dir / "feast" / "registry.db").exists():
        _cli(
            data_dir, "features", "build", "--data", str(data_dir / "simulated" / "events"),
            "--start", str(first), "--end", str(last), last_day=events_end,
        )  # fmt: skip
        _cli(data_dir, "features", "apply", last_day=events_end)
    _cli(
        data_dir, "features", "training-set", "--service", task.data.source, "--label", task.data.label,
        "--start", str(first), "--end", str(last), "--out", str(out), last_day=events_end,
    )  # fmt: skip
    return out


def _pretrain(data_dir: Path, before: pd.Timestamp, epochs: int, log) -> tuple[dict, np.ndarray, float]:
    """SASRec next-item model on every event before ``before``; (weights, item vocabulary, seconds)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from shopsight.training.models import build_model
    from shopsight.training.next_item.data import LeaveOneOut, SequenceData
    from shopsight.training.next_item.fit import train_next_item
    from shopsight.training.runtime.loop import LoopConfig

    events = ds.dataset(data_dir / "simulated" / "events", partitioning="hive").to_table()
    events = events.filter(ds.field("ts") < pa.scalar(before.to_pydatetime(), pa.timestamp("us", tz="UTC")))
    data = SequenceData.from_events(events)
    split = LeaveOneOut.split(data)
    torch.manual_seed(0)
    model = build_model("sasrec", n_items=data.n_items, d_model=64, dropout=0.2)
    started = time.perf_counter()
    train_next_item(model, split, LoopConfig(epochs=epochs, eval_every=5, patience=10), log=log)
    return model.state_dict(), data.item_ids, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=("purchase", "churn"), default="purchase")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--days", type=int, default=9, help="simulated days")
    parser.add_argument("--burn-in", type=int, default=0, help="first days without snapshots (history only)")
    parser.add_argument(
        "--quick", action="store_true", help="leave out the GAN oversampling and the pretrained SASRec"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--gan-epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from shopsight.training.binary.calibration import Calibration
    from shopsight.training.binary.data import SNAPSHOT, SnapshotFeatures, TimeSplit, read_training_set
    from shopsight.training.binary.fit import (
        TreeBaseline,
        balanced_pos_weight,
        oracle_probabilities,
        predict_probabilities,
        threshold_report,
        train_binary,
    )
    from shopsight.training.models import build_model, transfer_pretrained
    from shopsight.training.runtime.loop import LoopConfig
    from shopsight.training.runtime.metrics import decile_calibration
    from shopsight.training.tasks import get_task

    task = get_task(args.task)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-user-snapshots-"))
    started = time.perf_counter()
    path = prepare(data_dir, args.users, args.days, args.burn_in, task)
    prepare_seconds = time.perf_counter() - started
    split = TimeSplit.of(read_training_set(path))
    print(json.dumps(split.describe(), indent=1), flush=True)
    valid_snapshot = pd.to_datetime(split.valid[SNAPSHOT], utc=True).min()
    if args.quick:
        weights, item_ids, pretrain_seconds = None, None, 0.0
    else:
        weights, item_ids, pretrain_seconds = _pretrain(
            data_dir, valid_snapshot, args.pretrain_epochs, log=lambda line: print("  pretrain", line)
        )
    features = SnapshotFeatures.fit(split.train, item_ids=None if item_ids is None else item_ids[1:])
    train, valid, test = (features.transform(f) for f in (split.train, split.valid, split.test))
    rows: dict[str, dict] = {}

    truth = data_dir / "simulated" / "truth" / task.code.ORACLE_FILE
    oracle_test = oracle_probabilities(truth, test, task.code.ORACLE_COLUMN)
    oracle_valid = oracle_probabilities(truth, valid, task.code.ORACLE_COLUMN)

    def record(name: str, valid_proba, test_proba, seconds: float, note: str = "") -> None:
        predicted, observed, per_decile = decile_calibration(test.labels, test_proba)
        # the same deciles against the simulator's true probabilities: calibration without label noise
        _, true_rate, _ = decile_calibration(oracle_test, test_proba)
        rows[name] = {**threshold_report(valid.labels, valid_proba, test.labels, test_proba),
                      "decile_gap": float(np.max(np.abs(predicted - observed))),
                      "decile_gap_truth": float(np.max(np.abs(predicted - true_rate))),
                      "decile_rows": int(per_decile.min()),
                      "train_seconds": seconds, "note": note}  # fmt: skip
        r = rows[name]
        print(f"{name:<48} roc_auc {r['roc_auc']:.4f} pr_auc {r['pr_auc']:.4f} ece {r['ece']:.4f} "
              f"decile gap {r['decile_gap']:.4f} ({seconds:.0f} s)", flush=True)  # fmt: skip

    record("oracle (true probability)", oracle_valid, oracle_test, 0.0)

    for weight in (None, "balanced"):
        t0 = time.perf_counter()
        tree = TreeBaseline(class_weight=weight).fit(train)
        record(
            f"trees, {weight or 'unweighted'}",
            tree.predict(valid),
            tree.predict(test),
            time.perf_counter() - t0,
        )

    gan = None if args.quick else build_model("gan", epochs=args.gan_epochs)
    if gan is not None:
        t0 = time.perf_counter()
        cols = [f"f{k}" for k in range(train.dense.shape[1])]
        frame = pd.DataFrame(train.dense, columns=cols).assign(label=train.labels.astype(int))
        gan.fit(frame, "label", numeric=cols, categorical=[], log=lambda line: None)
        n_extra = int(len(train) - 2 * train.labels.sum())  # as many positives as negatives
        synthetic = gan.sample(max(n_extra, 0), condition=1)
        extra = (synthetic[cols].to_numpy(np.float32), np.ones(len(synthetic), np.float32))
        tree = TreeBaseline().fit(train, extra=extra)
        record("trees, GAN-oversampled positives", tree.predict(valid), tree.predict(test),
               time.perf_counter() - t0, f"{len(synthetic):,} synthetic positives")  # fmt: skip

    balanced = balanced_pos_weight(train.labels)
    loop = LoopConfig(
        epochs=args.epochs, batch_size=256, lr=1e-3, eval_every=1, patience=4, weight_decay=1e-5
    )
    common = {"n_items": features.n_items, "n_dense": features.n_dense, "n_categories": features.n_categories}
    runs = [
        ("sasrec, unweighted", "sasrec", {"d_model": 64, "dropout": 0.2}, 1.0, False),
        ("sasrec, weighted", "sasrec", {"d_model": 64, "dropout": 0.2}, balanced, False),
        (
            "sasrec, pretrained + fine-tuned, weighted",
            "sasrec",
            {"d_model": 64, "dropout": 0.2},
            balanced,
            True,
        ),
        ("lstm, weighted", "lstm", {"d_model": 64, "dropout": 0.2}, balanced, False),
    ]
    for name, model_name, config, pos_weight, pretrained in runs:
        if pretrained and weights is None:
            continue
        torch.manual_seed(0)
        model = build_model(model_name, **common, **config)
        note = f"pos_weight {pos_weight:.2f}"
        if pretrained:
            copied = transfer_pretrained(model, weights)
            note += f"; {len(copied)} tensors from next-item pretraining ({pretrain_seconds:.0f} s)"
        t0 = time.perf_counter()
        train_binary(model, train, valid, loop, pos_weight=pos_weight, log=lambda line: print("  ", line))
        seconds = time.perf_counter() - t0
        raw_valid, raw_test = predict_probabilities(model, valid), predict_probabilities(model, test)
        record(name, raw_valid, raw_test, seconds, note)
        calibration = Calibration.fit(raw_valid, valid.labels)
        record(
            f"{name}, calibrated",
            calibration(raw_valid),
            calibration(raw_test),
            seconds,
            f"{calibration.method} on the validation day (as registered and served)",
        )

    result = {"machine": describe_machine(), "task": task.name, "split": split.describe(), "rows": rows,
              "days": args.days, "burn_in": args.burn_in,
              "prepare_seconds": prepare_seconds, "users": args.users, "loop": loop.__dict__}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{task.name}.json").write_text(json.dumps(result, indent=2, default=str))
    machine = result["machine"]
    lines = [
        "",
        f"## {machine['date']}: {args.users:,} users, {args.days} days ({args.burn_in} of them history only), "
        f"{machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory']}, Python {machine['python']}",
        "",
        "Split: " + "; ".join(f"{part} {what}" for part, what in split.describe().items()) + ".",
        "",
        "| model | ROC-AUC | PR-AUC | log-loss | Brier | ECE | mean p | max decile gap: observed / true "
        "| precision | recall | F1 | train s | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['roc_auc']:.4f} | {r['pr_auc']:.4f} | {r['log_loss']:.4f} | {r['brier']:.4f} "
            f"| {r['ece']:.4f} | {r['mean_probability']:.3f} | {r['decile_gap']:.3f} / {r['decile_gap_truth']:.3f} "
            f"| {r['precision']:.3f} "
            f"| {r['recall']:.3f} | {r['f1']:.3f} | {r['train_seconds']:.0f} | {r['note']} |"
        )
    smallest = min(r["decile_rows"] for r in rows.values())
    rate = rows["oracle (true probability)"]["base_rate"]
    lines += [
        "",
        "Threshold of precision/recall/F1: the F1-best one on the validation day. Observed rate of "
        f"{task.data.label} on the test day {rate:.3f}. Max decile gap: the largest |mean predicted probability - rate| over the "
        "deciles of the model's test probabilities, against the observed rate (at least "
        f"{smallest:,} rows a decile: one standard error of a decile's rate is about "
        f"{np.sqrt(rate * (1 - rate) / smallest):.3f}) and against the simulator's true probability of the "
        "same rows (no label noise).",
    ]
    append_report(
        RESULTS / f"{task.name}.md",
        f"{task.name.capitalize()} ({task.data.label}), simulated users",
        f"python -m benchmarks.bench_user_snapshots --task {task.name} --users {args.users} --days {args.days} "
        f"--burn-in {args.burn_in}" + (" --quick" if args.quick else ""),
        lines,
    )


if __name__ == "__main__":
    main()
