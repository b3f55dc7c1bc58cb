"""Registered models travel as MLflow users expect: each task's pyfunc (next item, purchase, the
synthetic-users GAN) carries its code and pinned requirements, loads with ``mlflow.pyfunc.load_model`` in a
fresh venv that holds only its requirements.txt and predicts what the platform's own load predicts, and
``mlflow models serve -m models:/shopsight-next-item@champion`` answers a request with the pyfunc's
prediction. Models are registered as tests/component/test_promotion.py registers them (no Ray), against a
real MLflow server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tests.component.test_promotion import NAME, Registry, _purchase_versions
from tests.conftest import purchase_frame

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]

PURCHASE, GAN = "shopsight-purchase", "shopsight-synthetic-users"


class Registered:
    """One registered version of each pyfunc, with the input it is asked to predict."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.models: dict[str, tuple[str, type, pd.DataFrame, dict | None, tuple[str, ...]]] = {}

    def add(self, name, version, pyfunc, example, params=None, extra=()) -> None:
        self.models[name] = (str(version), pyfunc, example, params, extra)

    def uri(self, name: str) -> str:
        return f"models:/{name}/{self.models[name][0]}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, free_port):
    import mlflow

    from shopsight.platform.mlflow_server import stop_local_server
    from shopsight.training.binary.pyfunc import SnapshotClassifier, input_example
    from shopsight.training.models.gan import GANConfig, TabularGAN
    from shopsight.training.next_item.pyfunc import NextItemRecommender
    from shopsight.training.runtime.tracking import log_pyfunc
    from shopsight.training.synthetic_users.pyfunc import GAN_FILE, SyntheticUsers

    registry = Registry(tmp_path_factory.mktemp("portable"), free_port())
    registry.start()
    try:
        models = Registered(registry)
        version = registry.register(trained=True)
        registry.client.set_registered_model_alias(NAME, "champion", version)  # what serving resolves
        histories = pd.DataFrame(
            {"item_ids": [[100, 101, 102], [120], [105, 106, 107, 108, 109], [133, 999]]}
        )
        models.add(NAME, version, NextItemRecommender, histories, {"k": 5})

        frame = purchase_frame(users=150, days=4)
        version = _purchase_versions(registry, PURCHASE, frame)(trained=True)
        models.add(PURCHASE, version, SnapshotClassifier, input_example(frame.tail(8)))

        config = GANConfig(epochs=3, batch_size=50, noise_dim=8, generator_hidden=(32,), critic_hidden=(32,))
        gan = TabularGAN(config)
        gan.fit(frame, "buy_next_1d", numeric=["n_pv_1d", "n_cart_1d", "cvr_buy_pv_1d", "hours_since_buy"],
                categorical=["segment_id"], log=None)  # fmt: skip
        folder = registry.folder / "gan"
        folder.mkdir()
        gan.save(folder / GAN_FILE)
        wanted = pd.DataFrame({"buy_next_1d": [True, False, True, False, False]})
        mlflow.set_experiment("synthetic-users")
        with mlflow.start_run():  # as train.py's Candidate registers it: seed param, scipy beside the base
            info = log_pyfunc(
                SyntheticUsers, folder, wanted, GAN, params={"seed": 0}, requirements=("scipy",)
            )
        models.add(GAN, info.registered_model_version, SyntheticUsers, wanted, {"seed": 0}, ("scipy",))
        yield models
    finally:
        stop_local_server(registry.settings)


def test_each_registered_model_carries_its_code_and_pinned_requirements(registered):
    import mlflow
    import yaml

    from shopsight.training.runtime.model_code import code_modules, requirements

    for name, (_, pyfunc, _, _, extra) in registered.models.items():
        local = Path(mlflow.artifacts.download_artifacts(registered.uri(name)))
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        assert flavor["code"] == "code", name
        shipped = sorted(
            str(p.relative_to(local / "code").with_suffix("")).replace("/", ".").removesuffix(".__init__")
            for p in (local / "code").rglob("*.py")
        )
        assert shipped == code_modules(pyfunc), name
        listed = Path(mlflow.pyfunc.get_model_dependencies(registered.uri(name))).read_text().split()
        assert listed == requirements(extra), name
        assert "torch==2.13.0" in listed and not [line for line in listed if "+" in line]


# in the fresh venv: each model by URI from the tracking server, its prediction, and where its code came from
IN_VENV = r"""
import importlib.util, json, pickle, sys
from pathlib import Path
import mlflow

results = {}
for case in json.loads(sys.argv[1]):
    model = mlflow.pyfunc.load_model(case["uri"])
    out = model.predict(pickle.loads(Path(case["example"]).read_bytes()), params=case["params"])
    Path(case["out"]).write_bytes(pickle.dumps(out))
    module = sys.modules[type(model.unwrap_python_model()).__module__]
    results[case["uri"]] = {"class": type(model.unwrap_python_model()).__name__, "file": module.__file__}
platform = ("pyspark", "ray", "feast", "shopsight.platform")
absent = {name: importlib.util.find_spec(name) is None for name in platform}
files = [getattr(m, "__file__", None) for name, m in sys.modules.items() if name.startswith("shopsight.")]
print(json.dumps({"results": results, "absent": absent, "files": [f for f in files if f]}))
"""


def test_a_fresh_venv_with_only_the_requirements_predicts_as_the_platform(registered, model_venv, tmp_path):
    import mlflow

    from shopsight.training.runtime.tracking import same_predictions

    listed = set()
    for name in registered.models:
        listed |= set(Path(mlflow.pyfunc.get_model_dependencies(registered.uri(name))).read_text().split())
    started = time.perf_counter()
    python = model_venv(sorted(listed))
    built = time.perf_counter() - started
    cases, expected = [], {}
    for k, (name, (_, pyfunc, example, params, _)) in enumerate(registered.models.items()):
        uri = registered.uri(name)
        expected[uri] = (pyfunc.__name__, mlflow.pyfunc.load_model(uri).predict(example, params=params))
        example.to_pickle(tmp_path / f"example{k}.pkl")
        cases.append({"uri": uri, "params": params, "example": str(tmp_path / f"example{k}.pkl"),
                      "out": str(tmp_path / f"out{k}.pkl")})  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = registered.registry.uri
    done = subprocess.run(
        [str(python), "-c", IN_VENV, json.dumps(cases)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["absent"] == {"pyspark": True, "ray": True, "feast": True, "shopsight.platform": True}
    # all three in one process, each from its model's copy of the code: the only Shopsight there is
    assert report["files"] and all("/code/shopsight/training/" in f for f in report["files"])
    for k, case in enumerate(cases):
        result = report["results"][case["uri"]]
        assert result["class"] == expected[case["uri"]][0] and "/code/shopsight/" in result["file"]
        got = pd.read_pickle(tmp_path / f"out{k}.pkl")
        assert same_predictions(expected[case["uri"]][1], got), case["uri"]
    print(f"fresh venv ready in {built:.0f} s; {len(cases)} models predict as in the platform")


def test_mlflow_models_serve_answers_with_the_champions_prediction(registered, free_port, tmp_path):
    """``mlflow models serve`` of the champion alias, from the platform's venv against its tracking server:
    POST /invocations in MLflow's documented format answers what the pyfunc predicts."""
    import mlflow
    import numpy as np
    import requests

    _, _, histories, params, _ = registered.models[NAME]
    port, bin_dir = free_port(), Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.registry.uri}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the venv's uvicorn, as once activated
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "mlflow models serve did not answer /ping in 240 s"
            time.sleep(0.5)
        body = {"dataframe_split": histories.to_dict(orient="split", index=False), "params": params}
        answer = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
    finally:  # the server and the uvicorn it starts: the process group this test made
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(histories, params=params)
    assert [row["items"] for row in predictions] == [list(map(int, items)) for items in expected["items"]]
    assert np.allclose(
        [row["scores"] for row in predictions], np.array(expected["scores"].tolist()), atol=1e-6
    )
    assert len(predictions) == 4 and all(len(row["items"]) == params["k"] for row in predictions)
