"""Ray Train around the plain loop: 1 vs 2 workers, a worker failure resumes, a re-run resumes."""

from __future__ import annotations

import numpy as np
import pytest

from shopsight.training.loop import LoopConfig

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


def _train(pattern_file, tmp_path, name, workers=1, epochs=6, **kwargs):
    from shopsight.training.ray_train import train_with_ray

    loop = LoopConfig(epochs=epochs, batch_size=32, lr=5e-3, eval_every=2, patience=100)
    return train_with_ray(
        "sasrec", pattern_file, name=name, storage_path=tmp_path, workers=workers, model_config=MODEL,
        loop=loop, keep_checkpoints=20, **kwargs,
    )  # fmt: skip


def test_two_workers_reach_the_quality_of_one(ray_local, pattern_file, tmp_path):
    one = _train(pattern_file, tmp_path, "one", workers=1)
    two = _train(pattern_file, tmp_path, "two", workers=2)
    assert one.error is None and two.error is None
    assert one.metrics["valid_ndcg@10"] > 0.85
    assert abs(one.metrics["valid_hr@10_full"] - two.metrics["valid_hr@10_full"]) < 0.1
    assert two.metrics["valid_ndcg@10"] > 0.85
    assert _epochs(one) == _epochs(two) == [1, 2, 3, 4, 5, 6]


def test_a_failed_worker_resumes_from_the_last_checkpoint(ray_local, pattern_file, tmp_path):
    result = _train(pattern_file, tmp_path, "flaky", workers=2, fail_after_epoch=3, max_failures=2)
    assert result.error is None
    assert (tmp_path / "flaky" / ".injected_failure").exists(), "the failure was injected"
    # epochs 1-3 before the failure, 4-6 after it: each exactly once, none started over
    assert _epochs(result) == [1, 2, 3, 4, 5, 6]
    assert result.metrics["valid_ndcg@10"] > 0.85


def test_running_again_with_the_same_name_resumes(ray_local, pattern_file, tmp_path):
    first = _train(pattern_file, tmp_path, "resumable", epochs=3)
    assert _epochs(first) == [1, 2, 3]
    second = _train(pattern_file, tmp_path, "resumable", epochs=5)
    assert _epochs(second) == [1, 2, 3, 4, 5]  # 4 and 5 added to the first run's checkpoints
