"""GAN benchmark: our conditional WGAN-GP beside the ``ctgan`` package on the same real user rows.

Real rows: the simulator's users (``--users``, 9 days) through the Spark feature build; one row per
(user, snapshot day) with user_activity features, the user's KMeans segment (user_segment), the busiest
part of the day (a derived category) and the ``buy_next_1d`` label. The rows are split by user: 75% of
users train the generators, the other 25% are the real test rows (TSTR / TRTR) and the DCR holdout.

Both generators train on the same rows on the CPU with one thread, for a similar time budget (their
epochs differ in cost: ours runs ``n_critic`` = 5 critic steps per generator step, CTGAN one), then
each generates as many rows as the real training set; ``shopsight.training.synthetic_users.evaluate.synthetic_report``
scores both. Results are appended to benchmarks/results/gan.md, with a JSON file beside it.

    python -m benchmarks.bench_gan [--users 4000] [--epochs 30] [--ctgan-epochs 50] [--data-dir DIR]

``--data-dir`` reuses a data folder whose features were already built (skips simulation and Spark).
Needs the ``bench`` extra: ``pip install ctgan`` (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
START, END = date(2017, 11, 25), date(2017, 12, 2)
LABEL = "buy_next_1d"
NUMERIC = [
    "n_pv_1d",
    "n_cart_1d",
    "n_buy_1d",
    "n_pv_7d",
    "n_cart_7d",
    "n_fav_7d",
    "n_buy_7d",
    "n_items_7d",
    "n_categories_7d",
    "active_days_7d",
    "n_sessions_7d",
    "n_carted_not_bought",
    "cvr_buy_pv_7d",
    "share_evening",
    "hours_since_pv",
    "top_category_share",
]
CATEGORICAL = ["segment_id", "busiest_day_part"]
DAY_PARTS = ("night", "morning", "afternoon", "evening")


def _require_ctgan():
    try:
        from ctgan import CTGAN
    except ImportError:
        raise SystemExit(
            "bench_gan compares with the ctgan package, which is not installed: "
            "pip install ctgan==0.12.1 (or pip install -e '.[bench]')"
        ) from None
    return CTGAN


def build_data(users: int, tmp: Path) -> tuple[Path, dict]:
    """Simulate ``users`` for 9 days and build every feature table; returns the data folder and timings."""
    from shopsight.data import SimulatorConfig, simulate
    from shopsight.features.build import build_features
    from shopsight.platform import load_settings

    started = time.perf_counter()
    sim = simulate(SimulatorConfig(users=users, days=9, seed=0), tmp / "sim")
    overrides = {"data_dir": str(tmp / "dd"), "spark.master": "local[2]", "spark.shuffle_partitions": "4"}
    settings = load_settings(overrides=overrides, environ={}).settings
    build = build_features(settings, tmp / "sim" / "events", START, END)
    info = {"events": sim.events, "build_rows": build.rows, "data_seconds": time.perf_counter() - started}
    return tmp / "dd", info


def real_rows(data_dir: Path):
    """Feature rows joined with their label and segment, and the busiest part of the day as a category."""
    import numpy as np
    import pandas as pd

    features = data_dir / "features"
    tables = {name: pd.read_parquet(features / name) for name in ("user_activity", "labels", "user_segment")}
    for frame in tables.values():
        frame["snapshot_day"] = frame["snapshot_day"].astype(str)
    keys = ["user_id", "snapshot_day"]
    rows = (
        tables["user_activity"]
        .merge(tables["labels"][[*keys, LABEL]], on=keys)
        .merge(tables["user_segment"][[*keys, "segment_id"]], on=keys)
    )
    shares = rows[[f"share_{p}" for p in DAY_PARTS]].to_numpy()
    rows["busiest_day_part"] = np.array(DAY_PARTS)[shares.argmax(axis=1)]
    return rows[[*keys, *NUMERIC, *CATEGORICAL, LABEL]].reset_index(drop=True)


def split_by_user(rows, test_share: float = 0.25, seed: int = 0):
    import numpy as np

    users = rows.user_id.unique()
    test_users = np.random.default_rng(seed).choice(users, int(len(users) * test_share), replace=False)
    test = rows.user_id.isin(test_users)
    return rows[~test].reset_index(drop=True), rows[test].reset_index(drop=True)


def _schema_violations(real, synthetic) -> dict:
    """Rows a consumer of the schema would reject: negative or fractional counts, unseen categories."""
    import numpy as np

    counts = [c for c in NUMERIC if real[c].dtype.kind in "iu"]
    values = synthetic[counts].to_numpy(dtype=np.float64)
    return {
        "negative_counts": int((values < 0).any(axis=1).sum()),
        "fractional_counts": int((values != np.round(values)).any(axis=1).sum()),
        "unseen_categories": int(
            sum((~synthetic[c].isin(set(real[c]))).sum() for c in [*CATEGORICAL, LABEL])
        ),
    }


def run_ours(train, epochs: int) -> tuple:
    from shopsight.training.models import build_model

    gan = build_model("gan", epochs=epochs, log_every=5, seed=0)
    started = time.perf_counter()
    history = gan.fit(train, LABEL, numeric=NUMERIC, categorical=CATEGORICAL)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    synthetic = gan.sample(len(train), seed=1)  # conditions at the training data's buyer ratio
    return synthetic, fit_seconds, time.perf_counter() - started, history


def run_ctgan(train, epochs: int) -> tuple:
    CTGAN = _require_ctgan()
    columns = [*NUMERIC, *CATEGORICAL, LABEL]
    model = CTGAN(epochs=epochs, enable_gpu=False, verbose=True)
    model.set_random_state(0)
    started = time.perf_counter()
    model.fit(train[columns], discrete_columns=[*CATEGORICAL, LABEL])
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    synthetic = model.sample(len(train))
    return synthetic, fit_seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of our GAN")
    parser.add_argument("--ctgan-epochs", type=int, default=50, help="epochs of CTGAN")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    parser.add_argument("--data-dir", type=Path, help="a data folder with built features (skips the build)")
    args = parser.parse_args()
    _require_ctgan()  # before minutes of feature building
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from threadpoolctl import threadpool_limits

    from shopsight.training.synthetic_users.evaluate import synthetic_report

    torch.set_num_threads(args.threads)
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(args.threads):
        if args.data_dir:
            data_dir, data_info = args.data_dir, {"data_dir": str(args.data_dir)}
        else:
            data_dir, data_info = build_data(args.users, Path(tmp))
            print(f"simulated and built features in {data_info['data_seconds']:.0f} s")
        rows = real_rows(data_dir)
    train, test = split_by_user(rows)
    print(
        f"{len(train):,} real training rows, {len(test):,} real test rows, buyers {train[LABEL].mean():.1%}"
    )

    results = {}
    with threadpool_limits(args.threads):
        print(f"our GAN: {args.epochs} epochs")
        synthetic, fit_s, sample_s, history = run_ours(train, args.epochs)
        results["shopsight gan"] = {
            "epochs": args.epochs,
            "fit_seconds": fit_s,
            "sample_seconds": sample_s,
            "history": history,
            "schema_violations": _schema_violations(train, synthetic),
            **synthetic_report(train, synthetic, test, LABEL, NUMERIC, CATEGORICAL),
        }
        print(f"ctgan: {args.ctgan_epochs} epochs")
        synthetic, fit_s, sample_s = run_ctgan(train, args.ctgan_epochs)
        results["ctgan 0.12.1"] = {
            "epochs": args.ctgan_epochs,
            "fit_seconds": fit_s,
            "sample_seconds": sample_s,
            "schema_violations": _schema_violations(train, synthetic),
            **synthetic_report(train, synthetic, test, LABEL, NUMERIC, CATEGORICAL),
        }
    for name, r in results.items():
        summary = {k: r[k] for k in ("epochs", "fit_seconds", "tstr", "correlation", "schema_violations")}
        print(name, json.dumps({**summary, "columns": r["columns"]["mean"], "dcr": r["dcr"]}, default=float))

    RESULTS.mkdir(exist_ok=True)
    stamp = machine["date"][:10]
    payload = {
        "machine": machine,
        "data": {**data_info, "users": args.users, "train_rows": len(train), "test_rows": len(test)},
        "columns": {"numeric": NUMERIC, "categorical": CATEGORICAL, "label": LABEL},
        "results": results,
    }
    (RESULTS / f"gan-{stamp}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    append_report(
        RESULTS / "gan.md", "GAN benchmarks", "python -m benchmarks.bench_gan", _report(machine, payload)
    )


def _report(machine: dict, payload: dict) -> list[str]:
    data, results = payload["data"], payload["results"]
    lines = [
        f"\n## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, Python {machine['python']}\n",
        f"Real rows: {data['train_rows'] + data['test_rows']:,} (user, snapshot day) rows of {data['users']:,} simulated users, "
        f"split by user into {data['train_rows']:,} training and {data['test_rows']:,} test rows; "
        f"{len(NUMERIC)} numeric columns, {len(CATEGORICAL)} categorical, label `{LABEL}`. CPU, 1 thread each. "
        "Synthetic rows: as many as the training rows. TSTR/TRTR: ROC-AUC on the real test rows of a "
        "HistGradientBoostingClassifier trained on synthetic / real training rows. KS, Wasserstein (in real standard "
        "deviations), TVD: mean over columns. DCR: Euclidean distance to the nearest real training row after scaling "
        "(5,000 rows each), synthetic rows beside real holdout rows.\n",
        "| generator | epochs | fit s | TSTR AUC | TRTR AUC | TSTR/TRTR | KS | Wasserstein | TVD | corr diff mean / max | DCR median synth / holdout | DCR p05 synth / holdout | rows breaking the schema |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        t, m, c, d, v = r["tstr"], r["columns"]["mean"], r["correlation"], r["dcr"], r["schema_violations"]
        broken = f"{v['negative_counts']} negative, {v['fractional_counts']} fractional, {v['unseen_categories']} unseen"
        lines.append(
            f"| {name} | {r['epochs']} | {r['fit_seconds']:.0f} | {t['tstr_auc']:.3f} | {t['trtr_auc']:.3f} | **{t['ratio']:.3f}** | "
            f"{m['ks']:.3f} | {m['wasserstein']:.3f} | {m['tvd']:.3f} | {c['mean_abs']:.3f} / {c['max_abs']:.3f} | "
            f"{d['synthetic_median']:.2f} / {d['holdout_median']:.2f} | {d['synthetic_p05']:.3f} / {d['holdout_p05']:.3f} | {broken} |"
        )
    names = list(results)
    lines += [
        "\nPer column (numeric: KS; categorical and label: TVD):\n",
        "| column | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for column in [*NUMERIC, *CATEGORICAL, LABEL]:
        cells = []
        for name in names:
            entry = results[name]["columns"][column]
            cells.append(f"{entry.get('ks', entry.get('tvd')):.3f}")
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    history = results[names[0]]["history"]
    every = max(1, len(history) // 10)
    shown = ", ".join(f"{h['wasserstein']:.2f}" for h in history[::every])
    lines.append(
        f"\nOur GAN's Wasserstein estimate every {every} epochs from the first: {shown} (last {history[-1]['wasserstein']:.2f})."
    )
    return lines


if __name__ == "__main__":
    main()
