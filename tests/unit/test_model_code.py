"""What a registered pyfunc carries (shopsight.training.runtime.model_code): the Shopsight modules it loads
with and nothing of the platform, pinned requirements, and code that loads and predicts on its own (a fresh
interpreter whose only Shopsight is the copied code, with pyspark, ray and feast made unimportable). The
registry round trip in a separate venv is tests/component/test_portable_models.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from tests.conftest import purchase_frame

from shopsight.training.runtime.model_code import FORBIDDEN, code_modules, copy_code, requirements
from shopsight.training.tasks import TASKS


def test_each_tasks_pyfunc_carries_its_modules_and_none_of_the_platform():
    from shopsight.training.next_item.pyfunc import NextItemRecommender

    for task in TASKS.values():
        pyfunc = task.pyfunc.load_class()
        modules = code_modules(pyfunc)
        assert pyfunc.__module__ in modules and "shopsight.training.runtime.pyfunc" in modules, task.name
        assert not [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)], modules
    # the exact set: the pyfunc, the base class, the networks (build_model's families) and their package,
    # whose __init__ they import; the other packages travel as folders (namespace packages)
    assert code_modules(NextItemRecommender) == [
        "shopsight.training._errors",
        "shopsight.training.models",
        "shopsight.training.models._next_item_loss",
        "shopsight.training.models._user_head",
        "shopsight.training.models.gan",
        "shopsight.training.models.lstm",
        "shopsight.training.models.sasrec",
        "shopsight.training.next_item.pyfunc",
        "shopsight.training.runtime.pyfunc",
    ]


def test_a_module_that_imports_the_platform_when_it_loads_cannot_travel():
    # the training set's module reads the task table, which imports the platform's settings
    stranded = type("Stranded", (), {"__module__": "shopsight.training.binary.data"})
    with pytest.raises(ValueError, match=r"imports shopsight\.platform when it loads"):
        code_modules(stranded)


def test_requirements_are_pinned_to_the_installed_versions():
    import cloudpickle
    import mlflow
    import scipy
    import torch

    assert requirements(("scipy", "scikit-learn>=1.9,<2")) == [
        f"mlflow=={mlflow.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",  # the CPU or CUDA build is the serving machine's
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"scipy=={scipy.__version__}",
        "scikit-learn>=1.9,<2",
    ]


ALONE = r"""
import importlib.abc, importlib.machinery, importlib.util, json, pickle, sys
from pathlib import Path

class AsIfNotInstalled(importlib.abc.MetaPathFinder):
    # Shopsight only from the case's copy (this venv has it installed too); the engines not at all
    code = None

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyspark", "ray", "feast"):
            raise ImportError(f"{name} is not for a model's code")
        if name == "shopsight":
            return importlib.machinery.PathFinder.find_spec(name, [self.code])
        return None

finder = AsIfNotInstalled()
sys.meta_path.insert(0, finder)
results = {}
for case in json.loads(sys.argv[1]):
    for name in [m for m in sys.modules if m == "shopsight" or m.startswith("shopsight.")]:
        del sys.modules[name]  # each case brings its own copy
    finder.code = case["code"]
    module, _, cls = case["pyfunc"].partition(":")
    pyfunc = getattr(importlib.import_module(module), cls)
    model = pyfunc.from_folder(Path(case["folder"]))
    out = model.predict(None, pickle.loads(Path(case["example"]).read_bytes()), case["params"])
    loaded = sorted(m for m in sys.modules if m == "shopsight" or m.startswith("shopsight."))

    def places(module):  # a module's file; a namespace package's folders
        return [module.__file__] if getattr(module, "__file__", None) else list(module.__path__)

    outside = [m for m in loaded if not all(p.startswith(case["code"]) for p in places(sys.modules[m]))]
    platform = importlib.util.find_spec("shopsight.platform") is not None
    results[case["pyfunc"]] = {"loaded": loaded, "outside": outside, "platform": platform}
    Path(case["out"]).write_bytes(pickle.dumps(out))
print(json.dumps(results))
"""


def _tiny_models(folder):
    """One small model of each pyfunc (untrained networks, a GAN fitted for one epoch): ``(pyfunc, model
    folder, example, params)`` each."""
    import torch

    from shopsight.training.binary.calibration import Calibration
    from shopsight.training.binary.features import SnapshotFeatures
    from shopsight.training.binary.pyfunc import SnapshotClassifier, input_example
    from shopsight.training.binary.pyfunc import save_model_dir as save_binary
    from shopsight.training.models import build_model
    from shopsight.training.models.gan import GANConfig, TabularGAN
    from shopsight.training.next_item.pyfunc import NextItemRecommender
    from shopsight.training.next_item.pyfunc import save_model_dir as save_next_item
    from shopsight.training.synthetic_users.pyfunc import GAN_FILE, SyntheticUsers

    torch.manual_seed(0)
    frame = purchase_frame(users=60, days=4)
    next_item = build_model("sasrec", n_items=30, max_len=8, d_model=16)
    features = SnapshotFeatures.fit(frame, max_len=10)
    binary = build_model(
        "sasrec", n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories,
        max_len=10, d_model=16,
    )  # fmt: skip
    gan = TabularGAN(
        GANConfig(epochs=1, batch_size=50, noise_dim=8, generator_hidden=(16,), critic_hidden=(16,))
    )
    gan.fit(frame, "buy_next_1d", numeric=["n_pv_1d", "n_cart_1d", "hours_since_buy"],
            categorical=["segment_id"], log=None)  # fmt: skip
    (folder / "gan").mkdir()
    gan.save(folder / "gan" / GAN_FILE)
    calibration = Calibration("platt", slope=0.8, intercept=-0.3)
    wanted = pd.DataFrame({"buy_next_1d": [True, False, True, False]})
    return [
        (NextItemRecommender, save_next_item(folder / "next", "sasrec", next_item, np.arange(100, 131)),
         pd.DataFrame({"item_ids": [[101, 102, 103], [120], []]}), {"k": 5}),
        (SnapshotClassifier, save_binary(folder / "binary", "sasrec", binary, features, calibration),
         input_example(frame.head(6)), None),
        (SyntheticUsers, folder / "gan", wanted, {"seed": 0}),
    ]  # fmt: skip


def test_the_copied_code_alone_loads_and_predicts_each_pyfunc_as_the_platform_does(tmp_path):
    from shopsight.training.runtime.tracking import same_predictions

    cases, expected = [], {}
    for k, (pyfunc, folder, example, params) in enumerate(_tiny_models(tmp_path)):
        name = f"{pyfunc.__module__}:{pyfunc.__name__}"
        code = copy_code(pyfunc, tmp_path / f"code{k}").parent
        example.to_pickle(tmp_path / f"example{k}.pkl")
        expected[name] = pyfunc.from_folder(folder).predict(None, example, params)
        files = {"example": str(tmp_path / f"example{k}.pkl"), "out": str(tmp_path / f"out{k}.pkl")}
        cases.append({"pyfunc": name, "code": str(code), "folder": str(folder), "params": params, **files})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", ALONE, json.dumps(cases)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 3
    for k, case in enumerate(cases):
        result = results[case["pyfunc"]]
        # every Shopsight module it used came from the copy, and the platform is not there to import
        assert result["outside"] == [] and not result["platform"], result
        assert case["pyfunc"].partition(":")[0] in result["loaded"]
        got = pd.read_pickle(tmp_path / f"out{k}.pkl")
        assert same_predictions(expected[case["pyfunc"]], got), case["pyfunc"]
