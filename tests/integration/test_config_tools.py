"""The deployment files as their own tools read them: `nginx -t` on deploy/nginx.conf, `kubectl kustomize` on k8s/.

Each runs a process, so they live here; tests/unit checks the same files' contents without one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.unit.test_k8s_manifests import K8S, K8S_VERSIONS
from tests.unit.test_nginx_conf import nginx_binary, render_nginx_conf


@pytest.mark.nginx
def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    """`nginx -t` passes on the rendered copy, run unprivileged (skipped where nginx is not installed)."""
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    conf_path = render_nginx_conf(tmp_path, 18080, 18081)
    # -p: prefix for relative paths; -e: the error log used before the config is read (nginx >= 1.19.5).
    result = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-e", str(tmp_path / "log" / "startup.log"), "-c", str(conf_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_kustomize_build_is_valid() -> None:
    """`kubectl kustomize k8s/` builds offline into valid resources, without any Secret."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert "Secret" not in {d["kind"] for d in built}
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "g-aigateway"
