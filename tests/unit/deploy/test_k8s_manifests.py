"""deploy/k8s: every manifest validates against the Kubernetes schemas (scripts/check_k8s.sh,
offline), the kustomization lists them all, and what they say agrees with the code: the
probe paths are the service's health routes, every LORAFOLD_* variable is a setting, the
worker kinds listen on real job types, one GPU per GPU pod, Redis keeps an AOF on a volume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.routes.health import router as health_router
from lorafold.jobs import JobType
from lorafold.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
SCRIPT = ROOT / "scripts" / "check_k8s.sh"


def run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    """scripts/check_k8s.sh on a copy of the repo's layout rooted at `directory`."""
    env = {"PATH": "/usr/bin:/bin",
           "KUBERNETES_VALIDATE": f"{sys.executable} -m kubernetes_validate"}
    return subprocess.run(["bash", str(directory / "scripts" / "check_k8s.sh")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def documents() -> dict[str, list[dict[str, Any]]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(K8S.glob("*.yaml"))}


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for docs in documents().values() for d in docs
            if d.get("kind") == kind}


def containers() -> dict[str, dict[str, Any]]:
    return {name: d["spec"]["template"]["spec"]["containers"][0]
            for kind in ("Deployment", "StatefulSet") for name, d in resources(kind).items()}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    config = resources("ConfigMap")["lorafold-config"]["data"]
    return {**config, **{e["name"]: e["value"] for e in container.get("env", [])}}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(K8S, root / "deploy" / "k8s")
    (root / "scripts").mkdir()
    shutil.copy(SCRIPT, root / "scripts")
    return root


def test_manifests_validate(layout: Path) -> None:
    done = run_check(layout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid for Kubernetes 1.30.0 1.37.0" in done.stdout


@pytest.mark.parametrize(("mutation", "expected"), [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolice="x"),
     "imagePullPolice"),
    (lambda d: d.update(kind="Deploymnet"), "WARN"),
    (lambda d: d["spec"].update(replicas="two"), "replicas"),
])
def test_the_check_can_fail(layout: Path, tmp_path: Path, mutation: Any,
                            expected: str) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(layout, broken)
    path = broken / "deploy" / "k8s" / "api.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    mutation(docs[0])
    path.write_text(yaml.safe_dump_all(docs))
    done = run_check(broken)
    assert done.returncode != 0 and expected in done.stdout + done.stderr, done.stdout


def test_kustomization_lists_every_resource_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == {n for n in on_disk if not n.endswith(".example.yaml")}
    assert kustomization["namespace"] == "lorafold"
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"] for c in containers().values() if c["image"].startswith("lorafold/")}
    assert used == images


def test_probes_are_the_service_health_routes() -> None:
    routes = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    api = containers()["lorafold-api"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz"} <= routes


def test_every_variable_is_a_setting_and_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    secret = resources("Secret")["lorafold-secrets"]["stringData"]
    for name, container in containers().items():
        if name == "lorafold-redis":
            continue
        env = env_of(container)
        names = set(env) | set(secret)
        unknown = {n for n in names if n.removeprefix("LORAFOLD_").lower() not in fields}
        assert not unknown, f"{name}: not settings: {unknown}"
        for key, value in env.items():  # the values parse as Settings reads them
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None, environment="development")  # type: ignore[call-arg]
        for key in env:
            monkeypatch.delenv(key)
        assert settings.redis_url == "redis://lorafold-redis:6379/0"
        refs = [r for e in container["envFrom"] for r in e.values()]
        assert {"name": "lorafold-config"} in refs and {"name": "lorafold-secrets"} in refs


def test_worker_kinds() -> None:
    gpu, cpu = containers()["lorafold-worker-gpu"], containers()["lorafold-worker-cpu"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    kinds = {}
    for name, container in (("gpu", gpu), ("cpu", cpu)):
        types = json.loads(env_of(container)["LORAFOLD_WORKER_JOB_TYPES"])
        assert {JobType(t) for t in types}  # real job types
        kinds[name] = types
    assert kinds == {"gpu": ["unlearn", "merge"], "cpu": ["plan", "merge"]}
    assert set(kinds["gpu"]) | set(kinds["cpu"]) == {t.value for t in JobType}  # none unserved
    assert env_of(cpu)["LORAFOLD_GPUS"] == "none" and env_of(gpu)["LORAFOLD_GPUS"] == "auto"


def test_redis_keeps_an_aof_on_a_volume() -> None:
    redis = resources("StatefulSet")["lorafold-redis"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--appendonly"] == "yes" and pairs["--maxmemory-policy"] == "noeviction"
    mount = redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert mount["name"] == claim["metadata"]["name"] and pairs["--dir"] == mount["mountPath"]
