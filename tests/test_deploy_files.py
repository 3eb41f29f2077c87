"""Deployment files parse and refer to things that exist (no Docker engine or cluster here)."""

import re
from pathlib import Path

import yaml

from reward_server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent


def test_gpu_judges_file_is_valid_settings():
    data = yaml.safe_load((REPO / "deploy" / "judges.gpu.yaml").read_text())
    settings = ServerSettings(**data)
    assert {j.kind for j in settings.judges} == {"classifier", "generative"}


def test_kubernetes_manifests_parse_and_use_the_server_routes():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "reward-server.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "Deployment", "Service"} <= kinds.keys()
    ServerSettings(**yaml.safe_load(kinds["ConfigMap"]["data"]["judges.yaml"]))
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_server_dockerfile_copies_existing_paths_and_runs_the_cli():
    text = (REPO / "docker" / "server.Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+?) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    assert '"referee", "serve"' in text
