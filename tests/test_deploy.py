"""deploy/: the manifests pass .ci/validate-deploy.sh, a broken one fails it, and they agree with
the Dockerfile, the server's settings and each other where no schema can tell."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.version import Version

from service.settings import Settings
from tests.test_container_recipe import DOCKERFILE, Stage, exec_form, parse_dockerfile
from tests.test_lock import read_lock

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VALIDATE = ROOT / ".ci" / "validate-deploy.sh"
KSERVE_ENV = {"PROTOCOL"}  # read by KServe's controller, not by the server

Doc = dict[str, Any]


def load(relative: str) -> Doc:
    (doc,) = yaml.safe_load_all((DEPLOY / relative).read_text())
    assert isinstance(doc, dict), relative
    return doc


def validate(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VALIDATE), "--root", str(root)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def runtime() -> Stage:
    """The Dockerfile's default image, the one the manifests run."""
    (stage,) = [s for s in parse_dockerfile(DOCKERFILE.read_text()) if s.name == "runtime"]
    return stage


@pytest.fixture(scope="module")
def deployment() -> Doc:
    return load("kubernetes/deployment.yaml")


@pytest.fixture(scope="module")
def isvc() -> Doc:
    return load("kserve/inferenceservice.yaml")


def pod_specs(deployment: Doc, isvc: Doc) -> dict[str, Doc]:
    return {
        "deployment": deployment["spec"]["template"]["spec"],
        "kserve": isvc["spec"]["predictor"],
    }


@pytest.fixture(scope="module", params=["deployment", "kserve"])
def pod(request: pytest.FixtureRequest, deployment: Doc, isvc: Doc) -> Doc:
    """The pod spec of the Deployment, then of the InferenceService's predictor."""
    return pod_specs(deployment, isvc)[request.param]


def server(pod: Doc) -> Doc:
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    return container


def env(container: Doc) -> dict[str, Doc]:
    return {entry["name"]: entry for entry in container["env"]}


def port_number(container: Doc, port: int | str) -> int:
    """A probe's or Service's port, resolving a port name against the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def test_manifests_are_valid() -> None:
    result = validate(DEPLOY)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def _parent(doc: Any, path: str) -> tuple[Any, Any]:
    """The container of a dotted path's last step (list indices as numbers), and that step."""
    *steps, last = [int(step) if step.isdigit() else step for step in path.split(".")]
    for step in steps:
        doc = doc[step]
    return doc, last


def _set(doc: Doc, path: str, value: object) -> None:
    parent, key = _parent(doc, path)
    parent[key] = value


def _rename(doc: Doc, path: str, new: str) -> None:
    parent, key = _parent(doc, path)
    parent[new] = parent.pop(key)


CONTAINER = "spec.template.spec.containers.0"
PREDICTOR = "spec.predictor"
WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
BROKEN = [
    pytest.param(
        "kubernetes/deployment.yaml",
        lambda d: _set(d, "spec.replicas", "two"),
        "spec.replicas: 'two' is not of type 'integer'",
        id="deployment-replicas-not-a-number",
    ),
    pytest.param(
        "kubernetes/deployment.yaml",
        lambda d: _rename(d, f"{CONTAINER}.readinessProbe", "readinesProbe"),
        "'readinesProbe' was unexpected",
        id="deployment-misspelt-field",
    ),
    pytest.param(
        "kubernetes/service.yaml",
        lambda d: _set(d, "spec.ports.0.port", "80"),
        "spec.ports.0.port",
        id="service-port-not-a-number",
    ),
    pytest.param(
        "kubernetes/hpa.yaml",
        lambda d: _set(d, "apiVersion", "autoscaling/v3"),
        "Couldn't find schema for kind HorizontalPodAutoscaler",
        id="hpa-unknown-api-version",
    ),
    pytest.param(
        "kubernetes/pdb.yaml",
        lambda d: _set(d, "spec.minAvailable", [1]),
        "spec.minAvailable",
        id="pdb-min-available-a-list",
    ),
    pytest.param(
        "kubernetes/pvc.yaml",
        lambda d: _set(d, "spec.accessModes", "ReadWriteMany"),
        "spec.accessModes",
        id="pvc-access-modes-not-a-list",
    ),
    pytest.param(
        "kubernetes/kustomization.yaml",
        lambda d: d["resources"].remove("pdb.yaml"),
        "pdb.yaml is not listed",
        id="kustomization-misses-a-manifest",
    ),
    pytest.param(
        "kserve/inferenceservice.yaml",
        lambda d: _rename(d, f"{PREDICTOR}.minReplicas", "minReplica"),
        "'minReplica' was unexpected",
        id="kserve-misspelt-predictor-field",
    ),
    pytest.param(
        "kserve/inferenceservice.yaml",
        lambda d: _set(d, f"{PREDICTOR}.scaleMetric", "gpu"),
        "spec.predictor.scaleMetric",
        id="kserve-unknown-scale-metric",
    ),
    pytest.param(
        "kserve/inferenceservice.yaml",
        lambda d: _set(d, f"{PREDICTOR}.containers.0.ports.0.containerPort", "8000"),
        "spec.predictor.containers.0.ports.0.containerPort",
        id="kserve-container-port-not-a-number",
    ),
    pytest.param(
        "kserve/inferenceservice.yaml",
        lambda d: _set(d, "metadata.name", "VAE_1"),
        "metadata.name",
        id="kserve-name-not-dns-1035",
    ),
    pytest.param(
        "kuberay/rayjob.yaml",
        lambda d: _rename(d, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "'shutdownAfterJobFinish' was unexpected",
        id="rayjob-misspelt-field",
    ),
    pytest.param(
        "kuberay/rayjob.yaml",
        lambda d: _set(d, f"{WORKER}.rayStartParams", {"num-cpus": 4}),
        "spec.rayClusterSpec.workerGroupSpecs.0.rayStartParams.num-cpus",
        id="rayjob-start-param-not-a-string",
    ),
    pytest.param(
        "kuberay/rayjob.yaml",
        lambda d: _rename(d, f"{WORKER}.template.spec.containers.0.resources", "resource"),
        "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0",
        id="rayjob-worker-container-misspelt-field",
    ),
    pytest.param(
        "kuberay/rayjob.yaml",
        lambda d: _set(d, "spec.submissionMode", "K8sMode"),
        "spec.submissionMode",
        id="rayjob-unknown-submission-mode",
    ),
]


@pytest.mark.parametrize("relative, mutate, error", BROKEN)
def test_a_broken_manifest_fails(
    tmp_path: Path, relative: str, mutate: Callable[[Doc], None], error: str
) -> None:
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    doc = load(relative)
    mutate(doc)
    (root / relative).write_text(yaml.safe_dump(doc, sort_keys=False))
    result = validate(root)
    assert result.returncode == 1, result.stdout
    assert f"{root / relative}: " in result.stderr
    assert error in result.stderr


def test_probes_are_the_servers_health_endpoints_on_its_port(pod: Doc, runtime: Stage) -> None:
    container = server(pod)
    entrypoint = exec_form(runtime.args("ENTRYPOINT")[-1])
    port = int(entrypoint[entrypoint.index("--port") + 1])
    assert runtime.args("EXPOSE") == [str(port)]
    assert "command" not in container and "args" not in container, "keep the image's ENTRYPOINT"
    assert container["ports"][0]["containerPort"] == port  # KServe routes to the first port
    for probe, path in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ]:
        get = container[probe]["httpGet"]
        assert (get["path"], port_number(container, get["port"])) == (path, port), probe


def test_pod_runs_as_the_image_user_hardened(pod: Doc, runtime: Stage) -> None:
    (user,) = runtime.args("USER")
    uid, _, gid = user.partition(":")
    context = pod["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))
    assert context["runAsNonRoot"] is True
    container = server(pod)["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    # the read-only root leaves /tmp as the one writable path
    (tmp,) = [m["name"] for m in server(pod)["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp]
    assert "emptyDir" in volume


def test_env_names_are_server_settings(pod: Doc, runtime: Stage) -> None:
    names = env(server(pod))
    assert Settings.unknown_env(names) == []
    others = {n for n in names if not n.startswith(Settings.model_config["env_prefix"])}
    assert others <= KSERVE_ENV
    # the default bundle is the image's own
    assert names["VAE_BUNDLE"]["value"] == runtime.env()["VAE_BUNDLE"]


def test_threads_follow_the_cpu_limit(pod: Doc) -> None:
    container = server(pod)
    threads = env(container)["VAE_THREADS"]
    limit = container["resources"]["limits"]["cpu"]
    if "value" in threads:
        assert threads["value"] == limit
    else:
        ref = threads["valueFrom"]["resourceFieldRef"]
        assert ref == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}


def test_api_key_comes_from_an_optional_secret(pod: Doc) -> None:
    ref = env(server(pod))["VAE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True


def test_image_tag_is_the_project_version(pod: Doc) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert server(pod)["image"] == f"vae-server:{version}"


def test_hpa_scales_the_deployment(deployment: Doc) -> None:
    hpa = load("kubernetes/hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] >= 2
    # an HPA owns the replica count; a replicas field would reset it on each apply
    assert "replicas" not in deployment["spec"]
    assert "requests" in server(deployment["spec"]["template"]["spec"])["resources"]


@pytest.mark.parametrize(
    "relative, selector",
    [
        ("kubernetes/deployment.yaml", "spec.selector.matchLabels"),
        ("kubernetes/service.yaml", "spec.selector"),
        ("kubernetes/pdb.yaml", "spec.selector.matchLabels"),
    ],
)
def test_selectors_match_the_pod_labels(deployment: Doc, relative: str, selector: str) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    doc: Any = load(relative)
    for key in selector.split("."):
        doc = doc[key]
    assert doc and doc.items() <= labels.items()


def test_service_reaches_the_server_port(deployment: Doc) -> None:
    service = load("kubernetes/service.yaml")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", 80)
    container = server(deployment["spec"]["template"]["spec"])
    assert port_number(container, port["targetPort"]) == 8000


def test_bundle_volume_is_the_claim_mounted_read_only(deployment: Doc) -> None:
    pod = deployment["spec"]["template"]["spec"]
    claim = load("kubernetes/pvc.yaml")["metadata"]["name"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    (mount,) = [m for m in server(pod)["volumeMounts"] if m["name"] == volume["name"]]
    assert (mount["mountPath"], mount["readOnly"]) == ("/models/custom", True)


def test_kserve_predictor_is_a_v2_custom_container(isvc: Doc) -> None:
    container = server(isvc["spec"]["predictor"])
    # KServe serves the container of this name, and reads its protocol from PROTOCOL
    assert container["name"] == "kserve-container"
    assert env(container)["PROTOCOL"]["value"] == "v2"


def test_kserve_container_matches_the_deployments(deployment: Doc, isvc: Doc) -> None:
    specs = pod_specs(deployment, isvc)
    ours, theirs = server(specs["deployment"]), server(specs["kserve"])
    for key in ("image", "resources", "securityContext"):
        assert ours[key] == theirs[key], key
    assert set(env(ours)) == set(env(theirs)) - KSERVE_ENV
    for name in env(ours).keys() - {"VAE_THREADS"}:  # VAE_THREADS names its own container
        assert env(ours)[name] == env(theirs)[name], name


def test_rayjob_runs_the_dockerfiles_batch_target() -> None:
    """The RayJob's image is the Dockerfile's `batch` target at the project's version, whose lock
    pins the Ray the cluster declares and whose user the pods run as; the docs build it so."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cluster = load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    pods = [group["template"]["spec"] for group in groups]
    assert {c["image"] for pod in pods for c in pod["containers"]} == {
        f"vae-server-batch:{version}"
    }
    (stage,) = [s for s in parse_dockerfile(DOCKERFILE.read_text()) if s.name == "batch"]
    runs = stage.args("RUN")
    assert any("pip install --require-hashes -r requirements/batch.txt" in run for run in runs)
    assert "requirements/batch.txt requirements/" in stage.args("COPY")
    ray, _ = read_lock("batch.txt")["ray"]
    assert ray == Version(cluster["rayVersion"]), f"rayVersion is not the image's Ray ({ray})"
    uid = int(stage.args("USER")[-1].split(":")[0])
    assert all(pod["securityContext"]["runAsUser"] == uid for pod in pods)
    build = f"docker build --target batch -t vae-server-batch:{version} ."
    assert build in DOCKERFILE.read_text() and build in (ROOT / "docs" / "DEPLOY.md").read_text()
