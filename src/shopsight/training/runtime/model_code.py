"""What travels with a registered pyfunc, so that ``mlflow.pyfunc.load_model`` (and ``mlflow models serve``)
work where only the model's ``requirements.txt`` is installed, Shopsight not:

- its code: the pyfunc's module and, transitively, every ``shopsight`` module imported at module level,
  with the network families that ``build_model`` imports by name. MLflow stores them under the model's
  ``code/`` and puts that folder first on ``sys.path`` when it loads the model. Imports inside functions
  are left out: they serve training and evaluation, on the platform's side; what loading and predicting
  need is imported at module level, and :func:`code_modules` refuses a pyfunc whose modules import the
  platform (``shopsight.platform``, ``pyspark``, ``ray``, ``feast``, ...) at module level. A package
  travels as its folder alone (a namespace package) unless its own ``__init__`` is imported: models of
  several tasks then load into one process, each folder on ``sys.path`` adding its modules to the same
  ``shopsight`` package, where a regular package would hold only the first model's copy;
- its requirements, pinned to the versions it was trained and checked with.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import shutil
from pathlib import Path

ROOT = "shopsight"
# what a pyfunc's code may not import when it loads: the platform's engines and its upper layers
FORBIDDEN = (
    "feast",
    "pyspark",
    "ray",
    "shopsight.cli",
    "shopsight.data",
    "shopsight.features",
    "shopsight.lifecycle",
    "shopsight.platform",
    "shopsight.serving",
)
# what every pyfunc needs to load and predict: MLflow, cloudpickle (python_model.pkl is one), the engines
BASE_REQUIREMENTS = ("mlflow", "cloudpickle", "torch", "numpy", "pandas")


def code_modules(pyfunc: type) -> list[str]:
    """The ``shopsight`` modules ``pyfunc`` needs to load and predict, whose files travel with it, sorted
    (packages only imported as the parents of a module are not among them). ValueError naming the chain
    of imports when one of them imports a :data:`FORBIDDEN` module at module level."""
    from shopsight.training.models import MODELS

    families = sorted({module for module, _, _ in MODELS.values()})
    found: dict[str, str | None] = {}  # module -> the module that imports it
    todo: list[tuple[str, str | None]] = [(pyfunc.__module__, None)]
    while todo:
        name, importer = todo.pop()
        if name in found:
            continue
        found[name] = importer
        if name == "shopsight.training.models":  # build_model imports the family it builds by name
            todo.extend((family, name) for family in families)
        for imported in _imports(name):
            if _within(imported, FORBIDDEN):
                chain = [name]
                while found.get(chain[-1]):
                    chain.append(found[chain[-1]])
                raise ValueError(
                    f"{pyfunc.__name__}'s code imports {imported} when it loads "
                    f"({' <- '.join(chain)}): import it inside the function that needs it"
                )
            if _within(imported, (ROOT,)):
                todo.append((imported, name))
    return sorted(found)


def copy_code(pyfunc: type, folder: Path) -> Path:
    """The files of :func:`code_modules` copied under ``folder`` as a package tree (folders without an
    ``__init__`` are namespace packages); returns ``folder/shopsight``, the path to hand MLflow as
    ``code_paths``."""
    for name in code_modules(pyfunc):
        spec = importlib.util.find_spec(name)
        source = Path(spec.origin)
        relative = Path(*name.split("."))
        if source.name == "__init__.py":
            target = folder / relative / "__init__.py"
        else:
            target = folder / relative.parent / f"{relative.name}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return folder / ROOT


def requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """The model's pip requirements: :data:`BASE_REQUIREMENTS` and ``extra``, each pinned to the installed
    version (a requirement with its own specifier is kept as given). torch is pinned without its local
    build tag (``2.13.0``, not ``2.13.0+cpu``): the machine that serves the model picks its CPU or CUDA build.
    """
    pinned = []
    for requirement in (*BASE_REQUIREMENTS, *extra):
        if any(mark in requirement for mark in "<>=!~;@ "):
            pinned.append(requirement)
            continue
        version = importlib.metadata.version(requirement).split("+")[0]
        pinned.append(f"{requirement}=={version}")
    return pinned


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _imports(name: str) -> list[str]:
    """The modules ``name`` imports at module level (not inside functions, nor under TYPE_CHECKING)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"cannot package {name}: no Python source")
    tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
    package = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
    found: list[str] = []
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(base)
            if _within(base, (ROOT,)) and _is_package(base):  # `from pkg import submodule` imports it
                found.extend(
                    f"{base}.{alias.name}"
                    for alias in node.names
                    if alias.name != "*" and importlib.util.find_spec(f"{base}.{alias.name}") is not None
                )
    return found


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _module_level(body: list[ast.stmt]):
    """The statements that run when the module is imported: its body, into ``if`` and ``try`` blocks,
    but not ``if TYPE_CHECKING:`` (and not into functions or classes' methods)."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            )
            if not checking:
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level(block)
        else:
            yield node


__all__ = ["BASE_REQUIREMENTS", "FORBIDDEN", "code_modules", "copy_code", "requirements"]
