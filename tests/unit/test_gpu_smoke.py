"""scripts/gpu_smoke.py's pure parts (it runs only where a GPU is): its arguments, the plan of calls
a judges file gives (one per route and kind, each body a valid request of its route), how answers
pass or fail, the table, and the `vllm serve` command and throughput line of the comparison."""

from __future__ import annotations

import base64
import importlib.util
import io
import sys

import pytest
from PIL import Image

from referee.protocol import JudgeRequest, PairwiseRequest, ScoreRequest, WinRateRequest
from reward_server.compat import ClassificationRequest, OpenRLHFRequest
from tests.support import REPO

_spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "scripts" / "gpu_smoke.py")
smoke = importlib.util.module_from_spec(_spec)
sys.modules["gpu_smoke"] = smoke  # its dataclasses look their module up by name
_spec.loader.exec_module(smoke)

GPU_FILE = REPO / "deploy" / "judges.gpu.yaml"
MODELS = {
    "/score": ScoreRequest,
    "/pairwise": PairwiseRequest,
    "/judge": JudgeRequest,
    "/winrate": WinRateRequest,
    "/get_reward": OpenRLHFRequest,
    "/classify": ClassificationRequest,
}


def test_arguments_default_to_the_shipped_gpu_file_and_refuse_what_cannot_run():
    args = smoke.parse_args([])
    assert args.judges == GPU_FILE and args.url is None and not args.vllm_compare and args.pairs == 256
    assert smoke.parse_args(["--vllm-compare", "--pairs", "16"]).pairs == 16
    for bad in (
        ["--judges", "/no/such/file.yaml"],
        ["--pairs", "0"],
        ["--url", "http://127.0.0.1:8000", "--vllm-compare"],  # the comparison needs the GPU to itself
    ):
        with pytest.raises(SystemExit) as refused:
            smoke.parse_args(bad)
        assert refused.value.code == 2


def test_the_plan_of_the_gpu_file_has_one_call_per_route_and_kind():
    calls = smoke.plan(smoke.load_settings(GPU_FILE))
    got = {(c.judge, c.route) for c in calls}
    assert got == {
        ("skywork-rm", "/score"),
        ("skywork-rm", "/pairwise"),
        ("skywork-rm", "/winrate"),
        ("skywork-rm", "/get_reward"),
        ("skywork-rm", "/classify"),
        ("qwen-judge", "/score"),
        ("qwen-judge", "/pairwise"),
        ("qwen-judge", "/judge"),
        ("qwen-judge", "/winrate"),
        ("vlm-judge", "/score"),
        ("vlm-judge", "/pairwise"),
        ("vlm-judge", "/pairwise (image)"),
        ("vlm-judge", "/judge"),
        ("vlm-judge", "/winrate"),
    }
    assert len(calls) == len(got)
    for call in calls:  # every body is a request its route accepts
        MODELS[call.path.split("?")[0]].model_validate(call.body)
    image = next(c for c in calls if c.route == "/pairwise (image)")
    assert image.body["mode"] == "cot"
    for side in ("response_a", "response_b"):
        picture = Image.open(io.BytesIO(base64.b64decode(image.body["items"][0][side][0]["data"])))
        assert picture.format == "PNG"
    assert next(c for c in calls if c.route == "/get_reward").path == "/get_reward?judge=skywork-rm"


def test_the_plan_follows_each_kinds_routes(tmp_path):
    path = tmp_path / "judges.yaml"
    path.write_text(
        "judges:\n"
        "  - {name: clip, kind: clip, model: openai/clip-vit-base-patch32}\n"
        "  - {name: text-judge, kind: generative, model: Qwen/Qwen2.5-7B-Instruct}\n"
    )
    calls = smoke.plan(smoke.load_settings(path))
    routes = {(c.judge, c.route) for c in calls}
    assert ("clip", "/judge") not in routes and ("clip", "/classify") not in routes  # not clip's routes
    assert ("text-judge", "/pairwise (image)") not in routes  # its engine takes no images
    assert ("text-judge", "/judge") in routes and ("clip", "/score") in routes


def _call(path: str) -> smoke.Call:
    return smoke.Call("j", "generative", path, path, {})


@pytest.mark.parametrize(
    ("path", "status", "body", "ok", "says"),
    [
        ("/score", 200, {"results": [{"index": 0, "score": 1.5}]}, True, "score 1.5"),
        ("/score", 200, {"results": [{"index": 0, "score": None, "error": "too long"}]}, False, "too long"),
        ("/pairwise", 200, {"results": [{"p_a": 0.8, "verdict": "A"}]}, True, "p_a 0.8"),
        (
            "/pairwise",
            200,
            {"results": [{"p_a": None, "verdict": "invalid", "error": "no <answer>"}]},
            False,
            "invalid",
        ),
        ("/judge", 200, {"results": [{"kind": "verdict", "verdict": "B"}]}, True, "verdict B"),
        ("/winrate", 200, {"win_rates": [0.5, 1.0, None]}, False, "None"),
        ("/winrate", 200, {"win_rates": [0.5, 0.5]}, True, "win rates"),
        ("/get_reward", 200, {"rewards": [0.3]}, True, "rewards [0.3]"),
        ("/classify", 200, {"data": [{"probs": [0.7]}]}, True, "probs [0.7]"),
        ("/score", 422, {"error": "too_many_images", "message": "9 images"}, False, "HTTP 422: 9 images"),
        ("/classify", 503, "upstream down", False, "HTTP 503: upstream down"),
    ],
)
def test_an_answer_passes_only_with_a_value(path, status, body, ok, says):
    passed, detail = smoke.check(_call(path), status, body)
    assert passed is ok and says in detail


def test_the_table_names_every_call_and_counts_failures():
    rows = [
        smoke.Row(_call("/score"), True, "score 1.5", 0.2),
        smoke.Row(_call("/winrate"), False, "HTTP 500: boom", 1.0),
    ]
    text = smoke.render(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["judge", "kind", "route", "result"]
    assert "PASS" in lines[1] and "FAIL" in lines[2] and "HTTP 500: boom" in lines[2]
    assert lines[-1] == "1/2 passed, 1 FAILED"
    assert smoke.render(rows[:1]).splitlines()[-1] == "1/1 passed"


def test_the_comparison_serves_the_judges_model_as_referee_configures_it():
    settings = smoke.load_settings(GPU_FILE)
    assert smoke.throughput_judge(settings, None).name == "qwen-judge"  # the first generative judge
    vlm = smoke.throughput_judge(settings, "vlm-judge")
    cmd = smoke.vllm_serve_command(vlm, 8100)
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags["--port"] == "8100" and flags["--max-model-len"] == "16384"
    assert flags["--gpu-memory-utilization"] == "0.3" and flags["--limit-mm-per-prompt"] == '{"image": 8}'
    assert flags["--dtype"] == "bfloat16" and flags["--tensor-parallel-size"] == "1"
    with pytest.raises(SystemExit, match="not a generative judge"):
        smoke.throughput_judge(settings, "skywork-rm")
    pairs = smoke.pairs_for(3)
    assert len({q for q, _, _ in pairs}) == 3  # distinct prompts
    line = smoke.figure(vlm, 100, 2.0, 1.0)
    assert "referee 50.0 pairs/s, vllm serve 100.0 pairs/s (referee/vllm 0.50x)" in line
