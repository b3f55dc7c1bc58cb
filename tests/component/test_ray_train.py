"""Ray Train around the plain loop: 1 vs 2 workers, a worker failure resumes, a re-run resumes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shopsight.training.runtime.loop import LoopConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = {"max_len": 10, "d_model": 32, "dropout": 0.1}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pattern_file(tmp_path_factory):
    """SASRec-format file where each user walks items i, i+1, ...: learnable to near-perfect ranking."""
    path = tmp_path_factory.mktemp("data") / "pattern.txt"
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for user in range(1, 301):
            start = rng.integers(0, 40)
            f.writelines(f"{user} {100 + (start + t) % 40}\n" for t in range(12))
    return path


def _epochs(result) -> list[int]:
    return sorted(int(metrics["epoch"]) for _, metrics in result.best_checkpoints)


def _train(pattern_file, tmp_path, name, workers=1, epochs=6, swa_start=0, **kwargs):
    from shopsight.training.next_item.fit import setup
    from shopsight.training.runtime.ray_train import fit_worker, train_with_ray

    loop = LoopConfig(epochs=epochs, batch_size=32, lr=5e-3, eval_every=2, patience=100, swa_start=swa_start)
    return train_with_ray(
        fit_worker(setup), {"model": "sasrec", "model_config": MODEL, "data": pattern_file},
        metric="ndcg@10", name=name, storage_path=tmp_path, workers=workers, loop=loop, keep_checkpoints=20,
        **kwargs,
    )  # fmt: skip


def test_two_workers_reach_the_quality_of_one(ray_local, pattern_file, tmp_path):
    one = _train(pattern_file, tmp_path, "one", workers=1)
    two = _train(pattern_file, tmp_path, "two", workers=2)
    assert one.error is None and two.error is None
    assert one.metrics["valid_ndcg@10"] > 0.85
    assert abs(one.metrics["valid_hr@10_full"] - two.metrics["valid_hr@10_full"]) < 0.1
    assert two.metrics["valid_ndcg@10"] > 0.85
    assert _epochs(one) == _epochs(two) == [1, 2, 3, 4, 5, 6]


@pytest.mark.chaos
def test_a_failed_worker_resumes_from_the_last_checkpoint(ray_local, pattern_file, tmp_path, record):
    started = time.perf_counter()
    result = _train(pattern_file, tmp_path, "flaky", workers=2, fail_after_epoch=3, max_failures=2)
    assert result.error is None
    assert (tmp_path / "flaky" / ".injected_failure").exists(), "the failure was injected"
    # epochs 1-3 before the failure, 4-6 after it: each exactly once, none started over
    epochs = _epochs(result)
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert result.metrics["valid_ndcg@10"] > 0.85
    record(
        in_flight="1 run on 2 workers, 6 epochs, a worker failing after epoch 3",
        lost=len(epochs) - len(set(epochs)),  # epochs trained twice
        recovered=len(epochs),
        seconds_to_recover=f"{time.perf_counter() - started:.1f} (the whole run)",
    )


def test_the_weight_average_survives_a_failed_worker(ray_local, pattern_file, tmp_path):
    import torch

    from shopsight.training.runtime.loop import evaluated_weights
    from shopsight.training.runtime.ray_train import CHECKPOINT_FILE

    result = _train(pattern_file, tmp_path, "swa", swa_start=2, fail_after_epoch=3, max_failures=2)
    assert result.error is None and (tmp_path / "swa" / ".injected_failure").exists()
    assert _epochs(result) == [1, 2, 3, 4, 5, 6]
    with result.checkpoint.as_directory() as folder:
        state = torch.load(f"{folder}/{CHECKPOINT_FILE}", weights_only=False)
    # epochs 2-6 averaged: the restart after epoch 3 continued the average instead of starting a new one
    assert state["epoch"] == 6 and state["average"]["count"] == 5
    assert evaluated_weights(state) is state["average"]["mean"]
    assert not torch.equal(state["average"]["mean"]["item_emb.weight"], state["model"]["item_emb.weight"])
    assert result.metrics["valid_ndcg@10"] > 0.85


def test_running_again_with_the_same_name_resumes(ray_local, pattern_file, tmp_path):
    first = _train(pattern_file, tmp_path, "resumable", epochs=3)
    assert _epochs(first) == [1, 2, 3]
    second = _train(pattern_file, tmp_path, "resumable", epochs=5)
    assert _epochs(second) == [1, 2, 3, 4, 5]  # 4 and 5 added to the first run's checkpoints


GAN = {"epochs": 4, "batch_size": 100, "noise_dim": 16, "generator_hidden": (64, 64),
       "critic_hidden": (64, 64), "n_critic": 2, "lr_generator": 1e-3, "lr_critic": 1e-3}  # fmt: skip


@pytest.fixture(scope="module")
def purchase_set(tmp_path_factory):
    from tests.conftest import purchase_frame

    path = tmp_path_factory.mktemp("gan") / "training_set.parquet"
    purchase_frame(users=200, days=3).to_parquet(path, coerce_timestamps="us")
    return path


def _fit_gan(purchase_set, tmp_path, name, **kwargs):
    from shopsight.training.runtime.ray_train import train_with_ray
    from shopsight.training.synthetic_users.fit import METRIC, gan_worker

    return train_with_ray(
        gan_worker, {"model": "gan", "model_config": GAN, "data": purchase_set, "split_seed": 0},
        metric=METRIC, name=name, storage_path=tmp_path, loop=LoopConfig(epochs=4), keep_checkpoints=10,
        **kwargs,
    )  # fmt: skip


def _generator(result) -> dict:
    import torch

    from shopsight.training.runtime.ray_train import CHECKPOINT_FILE

    last = max(result.best_checkpoints, key=lambda pair: pair[1]["epoch"])[0]
    with last.as_directory() as folder:
        return torch.load(f"{folder}/{CHECKPOINT_FILE}", weights_only=False)["gan"]["generator"]


def test_a_failed_gan_worker_resumes_to_the_weights_of_an_uninterrupted_run(
    ray_local, purchase_set, tmp_path
):
    whole = _fit_gan(purchase_set, tmp_path, "gan-whole")
    flaky = _fit_gan(purchase_set, tmp_path, "gan-flaky", fail_after_epoch=2, max_failures=2)
    assert whole.error is None and flaky.error is None
    assert (tmp_path / "gan-flaky" / ".injected_failure").exists(), "the failure was injected"
    assert _epochs(whole) == _epochs(flaky) == [1, 2, 3, 4]  # epochs 3-4 ran once, after the restart
    assert 0 < flaky.metrics["valid_ks"] < 1 and flaky.metrics["samples_per_second"] > 0
    assert 0 < flaky.metrics["valid_tstr_ratio"] < 2
    # both networks, both optimizers and the random generators came back: the same weights as no failure
    a, b = _generator(whole), _generator(flaky)
    assert all(__import__("torch").equal(a[k], b[k]) for k in a)


def test_the_gan_refuses_several_workers(purchase_set, tmp_path):
    from shopsight.platform import ShopsightError

    with pytest.raises(ShopsightError, match="one worker, not 2: .*double backward"):
        _fit_gan(purchase_set, tmp_path, "gan-two", workers=2)
