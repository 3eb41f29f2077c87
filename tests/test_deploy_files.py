"""Deployment files parse and refer to things that exist (no Docker engine or cluster here)."""

import ast
import re
import sys
from pathlib import Path

import tomllib
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


def test_server_dockerfile_runs_the_cli():
    assert '"referee", "serve"' in (REPO / "docker" / "server.Dockerfile").read_text()


def _help(*cmd: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", *cmd, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _flags(args: list[str]) -> set[str]:
    return {a for a in args if a.startswith("--")}


def test_compose_stack_parses_and_refers_to_real_files_and_flags():
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "reward-server", "trainer-a", "trainer-b"}
    assert "--appendonly" in services["redis"]["command"] and "healthcheck" in services["redis"]
    server = services["reward-server"]
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "healthcheck" in server
    for name, svc in services.items():
        if "build" in svc:
            assert (REPO / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (REPO / "docker" / host).exists(), volume
    serve_help = _help("referee.cli", "serve")
    assert _flags(server["command"]) <= {f for f in ("--config", "--queue") if f in serve_help}
    trainer_help = _help("trainer.cli")
    for name in ("trainer-a", "trainer-b"):
        svc = services[name]
        assert {"redis", "reward-server"} <= set(svc["depends_on"])
        flags = _flags(svc["command"])
        assert all(f in trainer_help for f in flags), flags
        config = svc["command"][svc["command"].index("--config") + 1]
        assert (REPO / config).exists()


def test_dockerfiles_copy_existing_paths():
    for dockerfile in (REPO / "docker").glob("*.Dockerfile"):
        for src in re.findall(r"^COPY (.+?) \S+$", dockerfile.read_text(), flags=re.M):
            for path in src.split():
                assert (REPO / path).exists(), (dockerfile.name, path)


def test_kubernetes_stack_and_autoscaling_on_the_queue():
    from referee.keys import CONSUMER_GROUP, Keys

    docs = [
        d for f in sorted((REPO / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Job", "referee-trainer-job-a"),
        ("ScaledObject", "referee-server"),
        ("Deployment", "referee-server"),
    } <= kinds
    redis_set = next(d for d in docs if d["kind"] == "StatefulSet")
    assert "--appendonly" in redis_set["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_set["spec"]["volumeClaimTemplates"]
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["consumerGroup"] == CONSUMER_GROUP
    assert trigger["metadata"]["stream"] == Keys().stream("job-a")
    job = next(d for d in docs if d["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert _flags(args) <= {f for f in _flags(args) if f in _help("trainer.cli")}


def test_trainer_extra_covers_what_the_trainer_imports():
    """The trainer image installs only the trainer extra: it must hold every third-party import."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "trainer"
    ]
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[]", d)[0].replace("-", "_") for d in [*extra, *core]}
    provided = names | {"torch", "transformers", "datasets"}  # installed by trl
    for path in (REPO / "services" / "trainer").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else (
                    [node.module]
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    else []
                )
            )
            for mod in mods:
                top = mod.split(".")[0]
                if top in {"referee", "trainer"} or top in sys.stdlib_module_names:
                    continue
                assert top in provided, (path.name, top)
