"""The cluster files are valid and agree with each other: KubeRay manifests, the job runtime env, DeepSpeed examples.

A manifest is checked at three levels, and a broken copy of each must fail:
1. the RayCluster/RayJob fields against a JSON Schema of the KubeRay v1 CRDs, written from the Go types in
   ray-project/kuberay (``ray-operator/apis/ray/v1/raycluster_types.go``, ``rayjob_types.go``): field names, types,
   enums and required keys, with unknown keys rejected (no package ships the CRD schemas);
2. every pod template against the Kubernetes core schema that the ``kubernetes-validate`` package ships, in its
   strict form (unknown keys rejected);
3. this project's rules: GPU limits equal ``num-gpus``, one image everywhere, token auth, the RayJob runs a preset
   that loads.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import _get_excludes
from ray.runtime_env import RuntimeEnv

from conftest import ROOT
from vixml_ray.config import load_config

CLUSTER = ROOT / "cluster"
K8S_VERSION = "1.33"
GPU = "nvidia.com/gpu"
IMAGE_WORKDIR = "/home/ray/vixml-ray"  # WORKDIR of cluster/Dockerfile

# ------------------------------------------------------------------------------------- KubeRay v1 CRD structure
_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # the pod template itself: Kubernetes' schema, below


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_HEAD_GROUP = _closed({
    "template": _POD_TEMPLATE, "headService": _OBJ, "enableIngress": _BOOL, "ingressOptions": _OBJ,
    "resources": _STR_MAP, "labels": _STR_MAP, "rayStartParams": _STR_MAP,
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
}, required=("template",))
_WORKER_GROUP = _closed({
    "suspend": _BOOL, "groupName": {"type": "string", "minLength": 1}, "replicas": _INT, "minReplicas": _INT,
    "maxReplicas": _INT, "idleTimeoutSeconds": _INT, "priority": {"type": "integer"}, "resources": _STR_MAP,
    "labels": _STR_MAP, "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE, "scaleStrategy": _OBJ,
    "numOfHosts": _INT,
}, required=("groupName", "template"))
_CLUSTER_SPEC = _closed({
    "upgradeStrategy": _OBJ,
    "authOptions": _closed({"enableK8sTokenAuth": _BOOL, "secretName": _STR, "mode": {"enum": ["disabled", "token"]}}),
    "suspend": _BOOL, "managedBy": _STR,
    "autoscalerOptions": _closed({
        "resources": _OBJ, "image": _STR, "imagePullPolicy": _STR, "securityContext": _OBJ,
        "idleTimeoutSeconds": _INT, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]}, "env": {"type": "array"}, "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"}, "command": {"type": "array"}, "args": {"type": "array"},
    }),
    "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": _BOOL, "gcsFaultToleranceOptions": _OBJ,
    "historyServerOptions": _OBJ, "networkPolicy": _OBJ, "tlsOptions": _OBJ,
    "headGroupSpec": _HEAD_GROUP, "rayVersion": _STR, "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
}, required=("headGroupSpec",))
_JOB_SPEC = _closed({
    "activeDeadlineSeconds": _INT, "backoffLimit": _INT, "rayClusterSpec": _CLUSTER_SPEC,
    "submitterPodTemplate": _POD_TEMPLATE, "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
    "submitterConfig": _closed({"backoffLimit": _INT}), "managedBy": _STR, "deletionPolicy": _STR,
    "entrypoint": _STR, "runtimeEnvYAML": _STR, "jobId": _STR,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "entrypointResources": _STR, "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
    "ttlSecondsAfterFinished": _INT, "shutdownAfterJobFinishes": _BOOL, "suspend": _BOOL,
})
_DNS_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _closed({
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": _DNS_LABEL, "labels": _STR_MAP, "annotations": _STR_MAP}},
        "spec": spec,
    }, required=("apiVersion", "kind", "metadata", "spec"))


_SERVICE_SPEC = _closed({  # ray-operator/apis/ray/v1/rayservice_types.go
    "serveConfigV2": {"type": "string", "minLength": 1}, "rayClusterConfig": _CLUSTER_SPEC,
    "serviceUnhealthySecondThreshold": _INT, "deploymentUnhealthySecondThreshold": _INT,
    "rayClusterDeletionDelaySeconds": _INT, "excludeHeadPodFromServeSvc": _BOOL, "serveService": _OBJ,
    "upgradeStrategy": _closed({"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                                "clusterUpgradeOptions": _OBJ}),
    "managedBy": _STR,
}, required=("serveConfigV2", "rayClusterConfig"))
CRD_SCHEMAS = {"RayCluster": _resource("RayCluster", _CLUSTER_SPEC), "RayJob": _resource("RayJob", _JOB_SPEC),
               "RayService": _resource("RayService", _SERVICE_SPEC)}


# ------------------------------------------------------------------------------------------------- checks
def _load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: one resource per file"
    return docs[0]


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = doc["spec"]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    found = []
    if cluster:
        found.append(("headGroupSpec", cluster["headGroupSpec"].get("template")))
        found += [(f"workerGroupSpecs[{g.get('groupName')}]", g.get("template"))
                  for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        found.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
    return [(where, t) for where, t in found if t is not None]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for _, t in _pod_templates(doc) for c in t["spec"].get("containers", [])]


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """CRD-level errors, then the pod templates' errors under Kubernetes' strict core schema."""
    schema = CRD_SCHEMAS.get(doc.get("kind"))
    if schema is None:
        return [f"unknown kind {doc.get('kind')!r}"]
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    if errors:
        return errors
    for where, template in _pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{where}.{'.'.join(map(str, list(err.path)[1:]))}: {err.message}")
    return errors


def cluster_rule_errors(cluster: dict[str, Any]) -> list[str]:
    """This project's rules for the RayCluster: GPU groups for embedding and training, GPU limits equal to
    ``num-gpus``, sane replica bounds, one image, token auth, offline model loading, Ray's version."""
    spec, errors = cluster["spec"], []
    if spec.get("rayVersion") != ray.__version__:
        errors.append(f"rayVersion {spec.get('rayVersion')} is not the tested Ray {ray.__version__}")
    if spec.get("authOptions", {}).get("mode") != "token":
        errors.append("authOptions.mode must be token")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    if any(GPU in c.get("resources", {}).get("limits", {}) for c in head):
        errors.append("the head must not take a GPU")
    gpus_per_group = []
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        declared = int(group.get("rayStartParams", {}).get("num-gpus", 0))
        limits = sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0))
                     for c in group["template"]["spec"]["containers"])
        if declared != limits:
            errors.append(f"{name}: rayStartParams num-gpus={declared} but {GPU} limits={limits}")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            errors.append(f"{name}: replicas must lie in [minReplicas, maxReplicas]")
        gpus_per_group.append(declared)
    if not (1 in gpus_per_group and any(g > 1 for g in gpus_per_group)):
        errors.append(f"want a 1-GPU embedding group and a multi-GPU training group, got GPUs {gpus_per_group}")
    containers = _containers(cluster)
    if len({c["image"] for c in containers}) != 1:
        errors.append(f"containers use different images: {sorted({c['image'] for c in containers})}")
    for c in containers:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if env.get("HF_HUB_OFFLINE") != "1":
            errors.append(f"container {c['name']}: HF_HUB_OFFLINE must be '1'")
    return errors


def job_rule_errors(job: dict[str, Any], cluster: dict[str, Any]) -> list[str]:
    """The RayJob targets the RayCluster, authenticates with its token Secret, and runs a job script of the image
    with a preset and overrides that load."""
    errors = []
    spec = job["spec"]
    if spec.get("clusterSelector", {}).get("ray.io/cluster") != cluster["metadata"]["name"]:
        errors.append("clusterSelector does not select the RayCluster")
    secret = cluster["spec"]["authOptions"]["secretName"]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}) for e in submitter.get("env", [])}
    if refs.get("RAY_AUTH_TOKEN") != {"name": secret, "key": "auth_token"}:
        errors.append(f"submitter RAY_AUTH_TOKEN must come from Secret {secret}, key auth_token")
    if submitter["image"] != _containers(cluster)[0]["image"]:
        errors.append("submitter image differs from the cluster's")
    argv = shlex.split(spec["entrypoint"])
    if argv[:1] != ["python"] or not re.fullmatch(rf"{IMAGE_WORKDIR}/jobs/\w+\.py", argv[1] if len(argv) > 1 else ""):
        return errors + [f"entrypoint must run python {IMAGE_WORKDIR}/jobs/<job>.py, got {argv[:2]}"]
    if not (ROOT / Path(argv[1]).relative_to(IMAGE_WORKDIR)).is_file():
        errors.append(f"entrypoint runs {argv[1]}, which is not a job of this repository")
    if "--config" not in argv:
        return errors + ["entrypoint names no --config preset"]
    at = argv.index("--config")
    overrides = [a for a in argv[at + 2:] if "=" in a and not a.startswith("-")]
    try:
        load_config(argv[at + 1], overrides)
    except Exception as err:  # ConfigError names the key
        errors.append(f"entrypoint config does not load: {err}")
    return errors


# ------------------------------------------------------------------------------------------------ manifests
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-train.yaml"])
def test_manifest_validates(name: str) -> None:
    assert schema_errors(_load(name)) == []


def test_raycluster_follows_project_rules() -> None:
    assert cluster_rule_errors(_load("raycluster.yaml")) == []


def test_rayjob_runs_a_loadable_preset_on_the_cluster() -> None:
    assert job_rule_errors(_load("rayjob-train.yaml"), _load("raycluster.yaml")) == []


def test_dockerfile_builds_on_the_tested_ray() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert f"WORKDIR {IMAGE_WORKDIR}" in text
    assert "-c constraints.txt" in text and "'.[gpu]'" in text


def _group(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


CLUSTER_BREAKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "worker without template": lambda d: _group(d, "gpu-train").pop("template"),
    "typo workerGroupSpec": lambda d: d["spec"].__setitem__("workerGroupSpec", d["spec"].pop("workerGroupSpecs")),
    "bad upscalingMode": lambda d: d["spec"]["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
    "container typo resource": lambda d: _container(d).__setitem__("resource", _container(d).pop("resources")),
    "port as string": lambda d: _container(d)["ports"][0].__setitem__("containerPort", "6379"),
    "num-gpus mismatch": lambda d: _group(d, "gpu-train")["rayStartParams"].__setitem__("num-gpus", "4"),
    "replicas above max": lambda d: _group(d, "gpu-embed").__setitem__("replicas", 99),
    "auth off": lambda d: d["spec"]["authOptions"].__setitem__("mode", "disabled"),
    "other ray version": lambda d: d["spec"].__setitem__("rayVersion", "2.9.0"),
}


@pytest.mark.parametrize("name", sorted(CLUSTER_BREAKS))
def test_broken_raycluster_fails(name: str) -> None:
    doc = copy.deepcopy(_load("raycluster.yaml"))
    CLUSTER_BREAKS[name](doc)
    errors = schema_errors(doc)
    assert errors or cluster_rule_errors(doc), name


JOB_BREAKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "typo entryPoint": lambda d: d["spec"].__setitem__("entryPoint", d["spec"].pop("entrypoint")),
    "bad submissionMode": lambda d: d["spec"].__setitem__("submissionMode", "Batch"),
    "name with dots": lambda d: d["metadata"].__setitem__("name", "train-qwen2.5"),
    "wrong cluster": lambda d: d["spec"]["clusterSelector"].__setitem__("ray.io/cluster", "other"),
    "bad override": lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"] + " train.epoch=3"),
    "unknown job": lambda d: d["spec"].__setitem__(
        "entrypoint", d["spec"]["entrypoint"].replace("jobs/train.py", "jobs/trian.py")),
    "unknown preset": lambda d: d["spec"].__setitem__(
        "entrypoint", d["spec"]["entrypoint"].replace("--config ", "--config no-such-")),
}


@pytest.mark.parametrize("name", sorted(JOB_BREAKS))
def test_broken_rayjob_fails(name: str) -> None:
    doc = copy.deepcopy(_load("rayjob-train.yaml"))
    JOB_BREAKS[name](doc)
    errors = schema_errors(doc)
    assert errors or job_rule_errors(doc, _load("raycluster.yaml")), name


# ------------------------------------------------------------------------------------------------- serving
SERVE_BUILDER = "vixml_ray.serve.app:build"
BUILDER_ARGS = ("checkpoint", "index", "config", "version")  # the builder's own arguments; the rest are overrides


def serve_config_errors(doc: dict[str, Any]) -> list[str]:
    """Ray Serve's own schema of a config file, plus: the app is this project's builder with its two URIs and
    overrides that load, every deployment named is one the app creates, the encoder on a GPU, the shards off GPUs
    on the nodes that offer ``shard_slot``."""
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.parse_obj(doc)
    except Exception as err:  # pydantic's ValidationError names the field
        return [f"Serve schema: {err}"]
    errors = []
    for app in doc["applications"]:
        if app.get("import_path") != SERVE_BUILDER:
            errors.append(f"{app.get('name')}: import_path must be {SERVE_BUILDER}")
            continue
        args = {str(k): str(v) for k, v in (app.get("args") or {}).items()}
        missing = [k for k in ("checkpoint", "index") if k not in args]
        if missing:
            errors.append(f"{app['name']}: args miss {missing}")
        try:
            cfg = load_config(args.get("config"), [f"{k}={v}" for k, v in args.items() if k not in BUILDER_ARGS])
        except Exception as err:  # ConfigError names the key
            errors.append(f"{app['name']}: args do not load: {err}")
            continue
        names = {"ingress", "encoder", *(f"shard-{i}" for i in range(cfg.index.num_shards))}
        options = {d["name"]: d.get("ray_actor_options", {}) for d in app.get("deployments", [])}
        unknown = sorted(set(options) - names)
        if unknown:
            errors.append(f"{app['name']}: deployments {unknown} are not in the app ({sorted(names)})")
        if options.get("encoder", {}).get("num_gpus", 0) < 1 or cfg.serve.encoder_num_gpus < 1:
            errors.append(f"{app['name']}: the encoder must take a GPU (options and serve.encoder_num_gpus)")
        for i in range(cfg.index.num_shards):
            shard = options.get(f"shard-{i}", {})
            if shard.get("num_gpus", 0) != 0 or "shard_slot" not in shard.get("resources", {}):
                errors.append(f"{app['name']}: shard-{i} must take no GPU and a shard_slot (a CPU node)")
    return errors


def service_rule_errors(service: dict[str, Any]) -> list[str]:
    """The RayService embeds cluster/serve_config.yaml verbatim, its cluster offers ``shard_slot`` on a CPU group
    and GPUs equal to ``num-gpus``, token auth, one image, offline model loading, Ray's version."""
    spec, errors = service["spec"], []
    if yaml.safe_load(spec["serveConfigV2"]) != yaml.safe_load((CLUSTER / "serve_config.yaml").read_text()):
        errors.append("serveConfigV2 differs from cluster/serve_config.yaml")
    cluster = spec["rayClusterConfig"]
    if cluster.get("rayVersion") != ray.__version__:
        errors.append(f"rayVersion {cluster.get('rayVersion')} is not the tested Ray {ray.__version__}")
    if cluster.get("authOptions", {}).get("mode") != "token":
        errors.append("authOptions.mode must be token")
    slots = False
    for group in cluster.get("workerGroupSpecs", []):
        declared = int(group.get("rayStartParams", {}).get("num-gpus", 0))
        limits = sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0))
                     for c in group["template"]["spec"]["containers"])
        if declared != limits:
            errors.append(f"{group['groupName']}: rayStartParams num-gpus={declared} but {GPU} limits={limits}")
        slots |= declared == 0 and "shard_slot" in group.get("rayStartParams", {}).get("resources", "")
    if not slots:
        errors.append("no CPU worker group offers the shard_slot resource")
    containers = _containers(service)
    if len({c["image"] for c in containers}) != 1:
        errors.append("containers use different images")
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("HF_HUB_OFFLINE", {}).get("value") != "1":
            errors.append(f"container {c['name']}: HF_HUB_OFFLINE must be '1'")
        if "secretKeyRef" not in env.get("VIXML_API_KEY", {}).get("valueFrom", {}):
            errors.append(f"container {c['name']}: VIXML_API_KEY must come from a Secret")
    return errors


def test_serve_config_validates() -> None:
    assert serve_config_errors(yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())) == []


def test_rayservice_validates_and_embeds_the_serve_config() -> None:
    service = _load("rayservice.yaml")
    assert schema_errors(service) == []
    assert service_rule_errors(service) == []
    assert serve_config_errors(yaml.safe_load(service["spec"]["serveConfigV2"])) == []


def _app(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["applications"][0]


SERVE_BREAKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "typo in Serve's schema": lambda d: _app(d).__setitem__("import_paths", _app(d).pop("import_path")),
    "other builder": lambda d: _app(d).__setitem__("import_path", "vixml_ray.serve.app:app"),
    "bad override": lambda d: _app(d)["args"].__setitem__("serve.shard_replica", "2"),
    "no index": lambda d: _app(d)["args"].pop("index"),
    "unknown deployment": lambda d: _app(d)["deployments"][1].__setitem__("name", "shard-9"),
    "shard on a GPU": lambda d: _app(d)["deployments"][1]["ray_actor_options"].__setitem__("num_gpus", 1),
    "encoder on CPU": lambda d: _app(d)["deployments"][0]["ray_actor_options"].__setitem__("num_gpus", 0),
}


@pytest.mark.parametrize("name", sorted(SERVE_BREAKS))
def test_broken_serve_config_fails(name: str) -> None:
    doc = copy.deepcopy(yaml.safe_load((CLUSTER / "serve_config.yaml").read_text()))
    SERVE_BREAKS[name](doc)
    assert serve_config_errors(doc), name


SERVICE_BREAKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "typo serveConfig": lambda d: d["spec"].__setitem__("serveConfig", d["spec"].pop("serveConfigV2")),
    "stale serve config": lambda d: d["spec"].__setitem__(
        "serveConfigV2", d["spec"]["serveConfigV2"].replace('"4"', '"5"', 1)),
    "no shard slots": lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("rayStartParams", {}),
    "key in plain text": lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "env"].__setitem__(-1, {"name": "VIXML_API_KEY", "value": "hunter2"}),
}


@pytest.mark.parametrize("name", sorted(SERVICE_BREAKS))
def test_broken_rayservice_fails(name: str) -> None:
    doc = copy.deepcopy(_load("rayservice.yaml"))
    SERVICE_BREAKS[name](doc)
    assert schema_errors(doc) or service_rule_errors(doc), name


# ---------------------------------------------------------------------------------------------- runtime env
def runtime_env_errors(env: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Ray's own validation of the runtime env, plus: offline model loading, and Ray's exclude matcher uploads every
    source file of the project while leaving out the virtualenv, caches and data."""
    unknown = sorted(set(env) - set(RuntimeEnv.known_fields))
    if unknown:
        return [f"unknown runtime_env fields {unknown}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as err:
        return [str(err)]
    errors = []
    if env.get("env_vars", {}).get("HF_HUB_OFFLINE") != "1":
        errors.append("env_vars.HF_HUB_OFFLINE must be '1'")
    excluded = _get_excludes(root, env.get("excludes", []))
    sources = [p for folder in ("vixml_ray", "jobs") for p in (root / folder).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    dropped = [str(p.relative_to(root)) for p in sources if excluded(p)]
    if dropped:
        errors.append(f"excludes drop source files, e.g. {dropped[:3]}")
    kept = [name for name in (".venv", ".cache", "outputs", "datasets", ".git") if not excluded(root / name)]
    if kept:
        errors.append(f"excludes keep {kept}")
    return errors


def _runtime_env() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def test_runtime_env_is_valid() -> None:
    env = _runtime_env()
    assert env["working_dir"] == "."
    assert runtime_env_errors(env) == []


RUNTIME_ENV_BREAKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unknown field": lambda e: e.__setitem__("env_var", {}),
    "non-string env value": lambda e: e["env_vars"].__setitem__("HF_HUB_OFFLINE", 1),
    "online": lambda e: e["env_vars"].pop("HF_HUB_OFFLINE"),
    "unanchored data exclude": lambda e: e["excludes"].append("data"),
    "uploads the venv": lambda e: e["excludes"].remove("/.venv"),
}


@pytest.mark.parametrize("name", sorted(RUNTIME_ENV_BREAKS))
def test_broken_runtime_env_fails(name: str) -> None:
    env = copy.deepcopy(_runtime_env())
    RUNTIME_ENV_BREAKS[name](env)
    assert runtime_env_errors(env), name


# ------------------------------------------------------------------------------------------------ DeepSpeed
def _examples_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_deepspeed_examples", CLUSTER / "make_deepspeed_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deepspeed_examples_equal_what_training_generates() -> None:
    module = _examples_module()
    assert module.stale() == [], "run: python cluster/make_deepspeed_examples.py"
    rendered = {name: yaml.safe_load(text) for name, text in module.render().items()}
    stages = {name: ds["zero_optimization"]["stage"] for name, ds in rendered.items()}
    assert sorted(set(stages.values())) == [2, 3], stages
    for name, ds in rendered.items():
        assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0, name
        assert ds["train_batch_size"] == 2048, name
    assert any("offload_optimizer" in ds["zero_optimization"] for ds in rendered.values())


def test_deepspeed_drift_is_detected(tmp_path: Path) -> None:
    module = _examples_module()
    for name, text in module.render().items():
        (tmp_path / name).write_text(text)
    assert module.stale(tmp_path) == []
    victim = sorted(module.EXAMPLES)[0]
    (tmp_path / victim).write_text((tmp_path / victim).read_text().replace('"stage": 2', '"stage": 3'))
    (tmp_path / sorted(module.EXAMPLES)[1]).unlink()
    assert set(module.stale(tmp_path)) == set(sorted(module.EXAMPLES)[:2])
