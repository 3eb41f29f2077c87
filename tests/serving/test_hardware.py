"""What the real server's engines got from the CPU rule (dtype and core binding); the rule itself is
checked as a unit in ``tests/unit/test_hardware.py``."""

import os
import re

import yaml

from reward_server.hardware import cpu_bind_for, cpu_info, dtype_rule
from reward_server.judges import engine_key
from reward_server.settings import ServerSettings


def test_served_engines_got_the_dtype_and_cores_the_rule_chose(client, server_config, server_log):
    """Serving: /judges reports the dtype each engine runs in; the server log names the capability,
    the choice and the cores vLLM bound each worker to."""
    config = yaml.safe_load(server_config.read_text())
    settings = ServerSettings(**config)
    info = cpu_info()
    reported = {j["name"]: j["dtype"] for j in client.get("/judges").json()["judges"]}
    # an ensemble has no engine of its own (no dtype); judges sharing an engine report its dtype
    expected = {
        j.name: None if j.kind == "ensemble" else dtype_rule(j.engine.dtype, "cpu", info)[0]
        for j in settings.judges
    }
    assert reported == expected
    assert reported["smollm2"] == ("bfloat16" if info.native_bf16 else "float32")
    assert reported["tiny-rm"] == "float32"  # explicit in the judges file
    # what each engine got for its platform-dependent settings, and why (the CPU build's defaults)
    engines = {j["name"]: j["engine"] for j in client.get("/judges").json()["judges"]}
    assert engines["panel"] is None  # an ensemble has no engine of its own
    assert engines["smollm2"]["enforce_eager"].startswith("True (CPU build")
    assert (
        "of host RAM" in engines["tiny-rm"]["gpu_memory_utilization"]
        or "set explicitly" in (engines["tiny-rm"]["gpu_memory_utilization"])
    )

    if not server_log.exists():  # REFEREE_TEST_URL: a server started elsewhere
        return
    log = server_log.read_text()
    assert f"capability {info.capability}" in log
    assert f"dtype {reported['smollm2']}" in log
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or settings.cpu_binding == "vllm":
        return
    bound = [[int(c) for c in re.findall(r"\d+", m)] for m in re.findall(r"core ids=\[([\d, ]*)\]", log)]
    count = len({k for j in settings.judges if (k := engine_key(j))})  # engines, not judges
    wanted = []
    for i in range(count):
        spec = cpu_bind_for(i, count, settings.cpu_binding, info.cores)
        lo, _, hi = spec.partition("-")
        wanted.append(list(range(int(lo), int(hi or lo) + 1)))
    assert bound == wanted
