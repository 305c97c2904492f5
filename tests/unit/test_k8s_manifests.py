"""k8s/ manifests: valid against the Kubernetes schemas, wired together, and setting only contract settings.

Offline: schemas come from the kubernetes-validate package (`kubectl kustomize` runs in
tests/integration/test_config_tools.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import ENV_VARS, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "Dockerfile"

# Oldest Kubernetes the manifests must suit (ARCHITECTURE.md), and the newest schemas the package ships.
K8S_VERSIONS = sorted({"1.30", kubernetes_validate.latest_version().rsplit(".", 1)[0]})
# CustomResources the package has no schema for; only their shape is checked.
CRD_KINDS = {"ServiceMonitor"}
# In k8s/ but deliberately outside the base kustomization: placeholder keys must never be applied by `-k`.
NOT_IN_KUSTOMIZATION = {"secret.example.yaml"}
# Variables that are not gateway settings but tune the Python runtime in the image (Dockerfile ENV):
# unbuffered logs, no bytecode writes on a read-only root.
RUNTIME_ONLY_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _docs() -> list[tuple[str, dict[str, Any]]]:
    return [(str(p.relative_to(K8S)), doc) for p in _manifest_files() for doc in _load(p)]


DOCS = _docs()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployment() -> dict[str, Any]:
    return _one("Deployment", "g-aigateway")


def _gateway_container() -> dict[str, Any]:
    containers = _deployment()["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


def _configmap_data() -> dict[str, str]:
    return _one("ConfigMap", "g-aigateway")["data"]


def _secret_keys() -> set[str]:
    secret = _one("Secret")
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def _pod_specs() -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for _, d in DOCS if d["kind"] in {"Deployment", "StatefulSet"}]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("source", "doc"), DOCS, ids=[f"{src}:{doc['kind']}/{doc['metadata']['name']}" for src, doc in DOCS]
)
def test_manifest_validates_against_kubernetes_schema(source: str, doc: dict[str, Any], version: str) -> None:
    """Each built-in resource validates strictly (unknown fields rejected) against the Kubernetes schemas."""
    if doc["kind"] in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a CustomResource: no schema in kubernetes-validate (shape checked below)")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{source}: {doc['kind']}/{doc['metadata']['name']} invalid for {version} at {path}: {exc.message}")


def test_service_monitor_shape() -> None:
    """The optional ServiceMonitor lives outside the base and selects the gateway Service's named port."""
    monitors = [(src, d) for src, d in DOCS if d["kind"] == "ServiceMonitor"]
    assert monitors, "k8s/optional/servicemonitor.yaml is missing"
    service = _one("Service", "g-aigateway")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for source, monitor in monitors:
        assert source.startswith("optional/"), f"{source}: CRDs belong in k8s/optional/"
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["name"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint.get("path", "/metrics") == "/metrics"


def test_kustomization_lists_exactly_the_base_manifests() -> None:
    """The base kustomization names every manifest in k8s/ (not optional/, not the example Secret), all existing."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "duplicate resources"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization lists missing file {resource}"
    expected = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - NOT_IN_KUSTOMIZATION
    assert set(resources) == expected
    assert all(name in {p.name for p in K8S.glob("*.yaml")} for name in NOT_IN_KUSTOMIZATION)


def test_pods_run_locked_down() -> None:
    """Every container: non-root, no privilege escalation, no capabilities, read-only root, RuntimeDefault seccomp."""
    for pod in _pod_specs():
        pod_ctx = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False
        for container in pod["containers"]:
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            assert ctx["runAsNonRoot"] is True, container["name"]
            assert ctx["runAsUser"] != 0, container["name"]
            assert ctx["allowPrivilegeEscalation"] is False, container["name"]
            assert ctx["readOnlyRootFilesystem"] is True, container["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", container["name"]
    gateway_ctx = {**_deployment()["spec"]["template"]["spec"]["securityContext"],
                   **_gateway_container()["securityContext"]}
    assert gateway_ctx["runAsUser"] == 10001


def test_gateway_image_matches_the_dockerfile() -> None:
    """The Deployment runs g-aigateway:latest as the Dockerfile's user on the port it exposes."""
    container = _gateway_container()
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert container["image"] == "g-aigateway:latest"
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, flags=re.MULTILINE)
    exposed = {int(p) for p in re.findall(r"^EXPOSE (\d+)$", dockerfile, flags=re.MULTILINE)}
    assert exposed == {port["containerPort"] for port in container["ports"]}
    assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]' in dockerfile


def test_probes_and_port() -> None:
    """Probes hit /healthz (startup, liveness) and /readyz (readiness) on the port PORT names."""
    container = _gateway_container()
    http = next(p for p in container["ports"] if p["name"] == "http")
    assert http["containerPort"] == int(_configmap_data()["PORT"])
    probes = {name: container[name] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["httpGet"]["port"] in {"http", http["containerPort"]}
    # The embedding model loads at start: the startup probe must allow a minute or more.
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    metrics = next(p for p in container["ports"] if p["name"] == "metrics")
    assert metrics["containerPort"] == int(_configmap_data()["METRICS_PORT"]) != http["containerPort"]
    assert int(annotations["prometheus.io/port"]) == metrics["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_writable_paths_are_empty_dirs() -> None:
    """/tmp and PROMETHEUS_MULTIPROC_DIR are emptyDir mounts (the metrics one in memory) on a read-only root."""
    pod = _deployment()["spec"]["template"]["spec"]
    container = _gateway_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    multiproc_dir = env["PROMETHEUS_MULTIPROC_DIR"]["value"]
    assert "emptyDir" in mounts["/tmp"]
    assert mounts[multiproc_dir]["emptyDir"]["medium"] == "Memory"


def test_shutdown_outlasts_graceful_timeout() -> None:
    """terminationGracePeriodSeconds covers the preStop sleep plus GRACEFUL_TIMEOUT, so streams can finish."""
    pod = _deployment()["spec"]["template"]["spec"]
    graceful_timeout = int(_configmap_data()["GRACEFUL_TIMEOUT"])
    command = _gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert 0 < pre_stop <= 15
    assert pod["terminationGracePeriodSeconds"] > graceful_timeout + pre_stop


def test_workers_follow_the_cpu_limit() -> None:
    """WEB_CONCURRENCY comes from the container's CPU limit (whole CPUs), which must therefore be set."""
    container = _gateway_container()
    env = {e["name"]: e for e in container["env"]}
    field = env["WEB_CONCURRENCY"]["valueFrom"]["resourceFieldRef"]
    assert field == {"containerName": "gateway", "resource": "limits.cpu", "divisor": "1"}
    assert container["resources"]["limits"]["cpu"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


def test_objects_refer_to_each_other() -> None:
    """Service, HPA and PDB select the gateway pods; env refers to the ConfigMap and Secret that exist."""
    deployment = _deployment()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert _one("Service", "g-aigateway")["spec"]["selector"].items() <= pod_labels.items()
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    container = _gateway_container()
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == ["g-aigateway"]
    secret = _one("Secret")
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in _secret_keys()


def test_redis_url_points_at_the_demo_redis() -> None:
    """REDIS_URL names the headless Service of the demo StatefulSet on its port."""
    statefulset = _one("StatefulSet")
    service = _one("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    port = service["spec"]["ports"][0]["port"]
    assert _configmap_data()["REDIS_URL"].startswith(f"redis://{service['metadata']['name']}:{port}/")


def _manifest_env_names() -> set[str]:
    names = set(_configmap_data()) | _secret_keys()
    for pod in _pod_specs():
        for container in pod["containers"] + pod.get("initContainers", []):
            names |= {e["name"] for e in container.get("env", [])}
    return names


def _dockerfile_env_names() -> set[str]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("ENV "):
            names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line))
    return names


def test_env_names_are_in_env_example() -> None:
    """Every variable the manifests set is a setting documented in .env.example."""
    if not ENV_EXAMPLE.is_file():
        pytest.fail(".env.example does not exist yet: it must list every setting (ARCHITECTURE.md)")
    documented = set(re.findall(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(encoding="utf-8"),
                                flags=re.MULTILINE))
    unknown = _manifest_env_names() - documented
    assert not unknown, f"set by k8s/ but not in .env.example: {sorted(unknown)}"


def test_env_names_are_settings() -> None:
    """Every variable the manifests and the Dockerfile set is one app.config reads (or a runtime-only one)."""
    unknown = _manifest_env_names() - set(ENV_VARS)
    assert not unknown, f"set by k8s/ but not read by app.config: {sorted(unknown)}"
    unknown = _dockerfile_env_names() - set(ENV_VARS) - RUNTIME_ONLY_ENV
    assert not unknown, f"set by the Dockerfile but neither a setting nor runtime-only: {sorted(unknown)}"


def test_configmap_values_parse_as_settings() -> None:
    """The ConfigMap plus the Secret's keys make a valid Settings (no ConfigError at pod start)."""
    environ = {**_configmap_data(), **{key: "placeholder-key" for key in _secret_keys()},
               "WEB_CONCURRENCY": "2", "PROMETHEUS_MULTIPROC_DIR": "/var/run/prometheus"}
    settings = Settings.from_env(environ, dotenv=False)
    assert settings.port == 8080
    assert settings.graceful_timeout == int(_configmap_data()["GRACEFUL_TIMEOUT"])
