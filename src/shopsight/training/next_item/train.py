"""Train a next-item model end to end: Ray Train, MLflow tracking, the test protocol, registration.

One MLflow run per training run (:mod:`shopsight.training.runtime.tracking`): parameters, the dataset's
identity (path, content hash, users, items, interactions), per-epoch metrics, the test protocol
(HR@10/NDCG@10, sampled and full ranking) beside the popularity baseline, plots (learning curves, HR by
sequence length), an evaluation report, and the model as a pyfunc registered with the alias
``challenger``, checked after a round trip through the registry.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from shopsight.platform import Settings, ShopsightError
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.evaluate import Popularity, evaluate_next_item, scorer
from shopsight.training.runtime.loop import LoopConfig, evaluated_weights
from shopsight.training.runtime.tracking import (
    Candidate,
    Prepared,
    TrainSummary,
    dataset_identity,
    default_run_name,
    public,
    train_prepared,
)
from shopsight.training.tasks import get_task

TASK = get_task("next_item")


def prepare(
    settings: Settings,
    model_name: str,
    data: Path,
    *,
    model_config: dict | None = None,
    loop: LoopConfig | None = None,
    teachers: list[str] | None = None,
    from_data: bool = False,
) -> Prepared:
    """The interactions read and split once on the driver, the teachers loaded, for training runs.

    ``teachers``: registered next-item models (``models:/NAME/VERSION``) on the same item catalogue to
    distil into this one (:mod:`shopsight.training.next_item.distill`), with ``loop.distill_weight``.
    ``from_data``: the settings ``model_config`` leaves out (max_len, d_model, dropout, negatives, loss)
    are chosen from the data's statistics (:func:`shopsight.training.next_item.defaults.choose`); the
    choice and its reasons become the run's console notes and MLflow parameters (``chosen.*``).
    """
    from shopsight.training.next_item.defaults import DataStats, choose
    from shopsight.training.next_item.fit import setup
    from shopsight.training.runtime.ray_train import fit_worker

    TASK.check_model(model_name)
    loop = loop or LoopConfig()
    model_config = dict(model_config or {})
    sequences = SequenceData.from_file(data)
    notes: list[str] = []
    chosen_params: dict[str, str] = {}
    if from_data:
        choice = choose(DataStats.of(sequences), model_name)
        given = {k: v for k, v in model_config.items() if k in choice.values}
        notes = choice.lines(given)
        chosen_params = {f"chosen.{k}": why for k, why in choice.reasons.items() if k not in given}
        model_config = {**choice.values, **model_config}
    split = LeaveOneOut.split(sequences)
    if not (split.test_target > 0).any():
        raise ShopsightError(f"{data}: no user has 3 or more interactions; nothing to evaluate")
    teacher_states = _load_teachers(settings, teachers or [], sequences, model_config, loop.distill_weight)
    identity = dataset_identity(data)
    return Prepared(
        task=TASK,
        model_name=model_name,
        worker=fit_worker(setup),
        config={
            "model": model_name,
            "model_config": model_config,
            "data": data,
            **({"teachers": teacher_states} if teacher_states else {}),
        },
        identity=identity,
        params={
            "users": len(sequences.sequences),
            "items": sequences.n_items,
            "interactions": sequences.n_interactions,
            **({"teachers": " ".join(teachers)} if teachers else {}),
            **chosen_params,
        },
        finish=lambda state, config: evaluated_candidate(
            model_name, config, state, sequences, split, identity, loop.seed
        ),
        notes=tuple(notes),
    )


def train_next_item_model(
    settings: Settings,
    model_name: str,
    data: Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    model_config: dict | None = None,
    loop: LoopConfig | None = None,
    run_name: str | None = None,
    registered_model: str = TASK.registered_model,
    teachers: list[str] | None = None,
    log=print,
) -> TrainSummary:
    """Train, evaluate, log and register; returns the run, the registered version and the test metrics
    (``teachers``: see :func:`prepare`)."""
    loop = loop or LoopConfig()
    prepared = prepare(settings, model_name, data, model_config=model_config, loop=loop, teachers=teachers)
    return train_prepared(
        settings,
        prepared,
        loop=loop,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        run_name=run_name or default_run_name(model_name),
        registered_model=registered_model,
        log=log,
    )


def evaluated_candidate(
    model_name: str,
    model_config: dict,
    state: dict,
    sequences: SequenceData,
    split: LeaveOneOut,
    identity: dict[str, str],
    seed: int,
) -> Candidate:
    """The checkpoint's weights on the leave-one-out test beside popularity, ready to register."""
    from shopsight.training.models import build_model
    from shopsight.training.next_item.pyfunc import NextItemRecommender, save_model_dir

    model = build_model(model_name, n_items=sequences.n_items, **model_config)
    model.load_state_dict(evaluated_weights(state))
    model.eval()
    max_len = model.cfg.max_len
    test = evaluate_next_item(scorer(model), split, "test", max_len, seed=seed)
    popularity = public(evaluate_next_item(Popularity(split), split, "test", max_len, seed=seed))
    return Candidate(
        model_name=model_name,
        metrics=public(test),
        baselines={"popularity": popularity},
        report=_report(model_name, public(test), popularity, identity, int(state["epoch"])),
        save=lambda folder: save_model_dir(folder, model_name, model, sequences.item_ids),
        pyfunc=NextItemRecommender,
        example=_input_example(sequences),
        params={"k": 10},
        figures=lambda folder: _hit_rate_by_length(test, folder),
    )


def _load_teachers(
    settings: Settings, uris: list[str], sequences: SequenceData, model_config: dict, weight: float
) -> list[dict]:
    """The teachers' networks as the Ray workers rebuild them; each must know exactly this data's items."""
    from shopsight.training.next_item.evaluate import load_recommender

    if uris and model_config.get("loss", "bce") in ("bce", "gbce"):
        raise ShopsightError(
            f"distillation needs --loss sampled_softmax or softmax, not {model_config.get('loss', 'bce')}"
        )
    if uris and not 0.0 < weight <= 1.0:
        raise ShopsightError(f"the distillation weight must be in (0, 1], not {weight}")
    states = []
    for uri in uris:
        teacher = load_recommender(settings, uri)
        if not np.array_equal(teacher.item_ids, sequences.item_ids):
            raise ShopsightError(
                f"teacher {uri} was trained on another item catalogue ({len(teacher.item_ids) - 1:,} items; "
                f"this data has {sequences.n_items:,}): teachers must come from the same data"
            )
        net = teacher.model
        states.append({"model": teacher.model_name, "config": asdict(net.cfg), "state": net.state_dict()})
    return states


def _input_example(sequences: SequenceData) -> pd.DataFrame:
    """Two histories of different lengths, in the shop's item ids."""
    long = sequences.item_ids[sequences.sequences[0][-20:]].tolist()
    short = sequences.item_ids[sequences.sequences[-1][-3:]].tolist()
    return pd.DataFrame({"item_ids": [long, short]})


def _hit_rate_by_length(test: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, sampled, full = test["_lengths"], test["_ranks_sampled"], test["_ranks_full"]
    buckets = [(1, 5), (6, 10), (11, 20), (21, 50), (51, 10_000)]
    labels, hr, hr_full = [], [], []
    for lo, hi in buckets:
        chosen = (lengths >= lo) & (lengths <= hi)
        if chosen.any():
            labels.append(f"{lo}-{hi}" if hi < 10_000 else f">{lo - 1}")
            hr.append(float((sampled[chosen] < 10).mean()))
            hr_full.append(float((full[chosen] < 10).mean()))
    fig, axis = plt.subplots(figsize=(6, 4))
    x = np.arange(len(labels))
    axis.bar(x - 0.2, hr, 0.4, label="HR@10 (100 sampled negatives)")
    axis.bar(x + 0.2, hr_full, 0.4, label="HR@10 (full ranking)")
    axis.set_xticks(x, labels)
    axis.set_xlabel("history length")
    axis.legend()
    fig.tight_layout()
    fig.savefig(folder / "hr_by_sequence_length.png", dpi=100)
    plt.close(fig)


def _report(model_name: str, test: dict, popularity: dict, identity: dict, epoch: int) -> str:
    rows = [
        ("HR@10", "hr@10"),
        ("NDCG@10", "ndcg@10"),
        ("HR@10 full", "hr@10_full"),
        ("NDCG@10 full", "ndcg@10_full"),
    ]
    lines = [
        f"# Next-item evaluation: {model_name} (best epoch {epoch})",
        "",
        f"Data: {identity['dataset.path']} (sha256 {identity['dataset.sha256'][:12]}), leave-one-out test, "
        f"{int(test['users']):,} users; sampled = the target among 100 uniformly sampled unseen items.",
        "",
        f"| metric | {model_name} | popularity |",
        "| --- | ---: | ---: |",
        *[f"| {label} | {test[key]:.4f} | {popularity[key]:.4f} |" for label, key in rows],
    ]
    return "\n".join(lines) + "\n"
