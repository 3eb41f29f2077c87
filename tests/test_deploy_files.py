"""Deployment files parse and refer to things that exist (no Docker engine or cluster here)."""

import ast
import itertools
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
    _assert_scales_on_the_backlog_of_every_job(scaled, docs)
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


def _metric_name(metric) -> str:
    return metric.describe()[0].name


def _assert_scales_on_the_backlog_of_every_job(scaled: dict, docs: list[dict]) -> None:
    """The autoscaler follows what waits in all job streams (a metric the consumers publish), not
    the pending entries of one stream named in the manifest."""
    from reward_server import metrics
    from reward_server.settings import QueueSettings

    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert f"max({_metric_name(metrics.QUEUE_BACKLOG)})" in query  # a global figure: max, not sum
    assert f"sum({_metric_name(metrics.QUEUE_INFLIGHT)})" in query
    assert int(trigger["metadata"]["threshold"]) == QueueSettings().max_inflight
    assert trigger["metadata"]["serverAddress"].startswith("http")
    assert "requests:" not in yaml.safe_dump(scaled)  # no stream named: streams are per job
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "referee-server")
    annotations = server["spec"]["template"]["metadata"]["annotations"]
    port = server["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(port)


def test_the_backlog_metric_is_served_at_metrics():
    from prometheus_client import generate_latest

    from reward_server import metrics

    exposed = generate_latest().decode()
    for metric in (metrics.QUEUE_BACKLOG, metrics.QUEUE_INFLIGHT):
        assert f"\n{_metric_name(metric)} " in exposed


def _redis_args(args: list[str]) -> dict[str, str]:
    return {a.removeprefix("--"): b for a, b in itertools.pairwise(args) if a.startswith("--")}


def test_redis_memory_is_bounded_without_evicting_queue_data():
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "redis.yaml").read_text()))
    redis_set = next(d for d in docs if d["kind"] == "StatefulSet")
    for args in (
        compose["services"]["redis"]["command"],
        redis_set["spec"]["template"]["spec"]["containers"][0]["args"],
    ):
        opts = _redis_args(args)
        assert opts["maxmemory-policy"] == "noeviction" and opts["appendonly"] == "yes"
        assert opts["maxmemory"].endswith(("mb", "gb"))
    limit = redis_set["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    maxmemory = _redis_args(redis_set["spec"]["template"]["spec"]["containers"][0]["args"])["maxmemory"]
    assert int(maxmemory.removesuffix("gb")) < int(limit.removesuffix("Gi"))  # room for AOF rewrites


def test_shutdown_grace_fits_the_pod_termination_grace_period():
    from reward_server.settings import QueueSettings

    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "reward-server.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    queue = ServerSettings(**yaml.safe_load(kinds["ConfigMap"]["data"]["judges.yaml"])).queue
    assert queue.shutdown_grace_s == QueueSettings().shutdown_grace_s < 30  # below k8s' default
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    # preStop, then SIGTERM: the grace period must cover both, with time to stop the engines.
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + queue.shutdown_grace_s + 10


def test_health_checks_use_what_the_vllm_image_has():
    """vLLM's image has python3 but no `python` (nor curl)."""
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    test = compose["services"]["reward-server"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python3"] and "/readyz" in test[-1] and "httpx" not in test[-1]
    dockerfile = (REPO / "docker" / "server.Dockerfile").read_text()
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\n")[1]
    assert healthcheck.strip().startswith("CMD python3 ") and "/readyz" in healthcheck
