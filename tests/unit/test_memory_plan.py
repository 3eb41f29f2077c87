"""The memory plan and placement rule, on the published configs of real judges, without a GPU.

Numbers from the models' published files on the Hugging Face hub:
- meta-llama/Llama-3.1-8B-Instruct: config.json hidden_size 4096, intermediate_size 14336,
  num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, head_dim 128, vocab_size
  128256, bfloat16; model.safetensors.index.json total_size 16060522496 (8,030,261,248 parameters).
- Skywork/Skywork-Reward-V2-Llama-3.1-8B: the same decoder as LlamaForSequenceClassification with
  one label (no LM head, a 4096 x 1 score head).
- Qwen/Qwen2.5-7B-Instruct: hidden_size 3584, intermediate_size 18944, num_hidden_layers 28,
  num_attention_heads 28, num_key_value_heads 4, vocab_size 152064, untied embeddings, bfloat16;
  total_size 15231233024 (7,615,616,512 parameters).
- Qwen/Qwen2.5-VL-7B-Instruct: the same language model plus a vision tower; total_size 16584333312.
"""

import json

import pytest
from typer.testing import CliRunner

from referee.cli import app
from reward_server.judge_settings import EngineSettings
from reward_server.memory_plan import (
    EngineSpec,
    GiB,
    PlanError,
    engines_on,
    footprint,
    kv_bytes_per_token,
    parameter_count,
    parse_gpus,
    place_engines,
    plan,
)
from reward_server.settings import ServerSettings
from tests.support import REPO

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
SKYWORK_RM_V2_8B = {
    **LLAMA_31_8B,
    "architectures": ["LlamaForSequenceClassification"],
    "id2label": {"0": "LABEL_0"},
    "label2id": {"LABEL_0": 0},
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN25_VL_7B = {
    **QWEN25_7B,
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "max_position_embeddings": 128000,
    "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584, "patch_size": 14},
}


def _model(tmp_path, name: str, config: dict, total_size: int | None = None, shards: list[int] = ()) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if total_size is not None:
        index = {"metadata": {"total_size": total_size}, "weight_map": {}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for i, size in enumerate(shards):
        with open(folder / f"model-{i:05d}.safetensors", "wb") as f:
            f.truncate(size)  # sparse: the size is what counts
    return str(folder)


def test_parameter_counts_from_configs_match_the_published_weights():
    assert parameter_count(LLAMA_31_8B) * 2 == 16060522496
    assert parameter_count(QWEN25_7B) * 2 == 15231233024
    # the reward model: the LM head (128256 x 4096) replaced by one score row
    assert parameter_count(SKYWORK_RM_V2_8B) == 8030261248 - 128256 * 4096 + 4096


def test_kv_cache_per_token_is_layers_kv_heads_head_dim_k_and_v_dtype():
    assert kv_bytes_per_token(SKYWORK_RM_V2_8B, 2) == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert kv_bytes_per_token(QWEN25_VL_7B, 2) == 28 * 4 * 128 * 2 * 2
    # a config whose language model sits in text_config (newer transformers)
    nested = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "text_config": QWEN25_7B}
    assert kv_bytes_per_token(nested, 2) == 57344


def test_footprint_reads_the_index_the_shards_or_the_config(tmp_path):
    vl = footprint(_model(tmp_path, "vl", QWEN25_VL_7B, total_size=16584333312), "auto")
    assert vl.weights_bytes == 16584333312 and "index" in vl.source
    assert footprint(str(tmp_path / "vl"), "float32").weights_bytes == 2 * 16584333312
    sharded = footprint(_model(tmp_path, "q", QWEN25_7B, shards=[3_945_943_040, 3_864_726_320]), "auto")
    assert sharded.weights_bytes == 3_945_943_040 + 3_864_726_320
    rm = footprint(_model(tmp_path, "rm", SKYWORK_RM_V2_8B), "bfloat16")
    assert rm.weights_bytes == parameter_count(SKYWORK_RM_V2_8B) * 2 and "parameter count" in rm.source
    assert footprint(str(tmp_path / "missing"), "auto") is None
    assert footprint("someone/unknown-model", "auto") is None


def _judges(tmp_path, vl_fraction: float = 0.2, **vl_engine) -> ServerSettings:
    rm = _model(tmp_path, "rm", SKYWORK_RM_V2_8B)
    qwen = _model(tmp_path, "qwen", QWEN25_7B, total_size=15231233024)
    vl = _model(tmp_path, "vl", QWEN25_VL_7B, total_size=16584333312)
    eng = {"dtype": "bfloat16", "max_model_len": 8192}
    return ServerSettings(
        judges=[
            {
                "name": "skywork-rm",
                "kind": "classifier",
                "model": rm,
                "engine": {**eng, "gpu_memory_utilization": 0.35},
            },
            {
                "name": "qwen-judge",
                "kind": "generative",
                "model": qwen,
                "engine": {**eng, "gpu_memory_utilization": 0.3},
            },
            {
                "name": "vlm-judge",
                "kind": "generative",
                "model": vl,
                "engine": {**eng, "gpu_memory_utilization": vl_fraction, **vl_engine},
            },
        ]
    )


def test_the_old_gpu_file_is_refused_naming_the_judge_and_the_fraction_that_fits(tmp_path):
    result = plan(_judges(tmp_path, 0.2), parse_gpus("1x80GiB"))
    assert not result.ok and len(result.problems) == 1
    (problem,) = result.problems
    assert "'vlm-judge'" in problem and "gives it 16.0 GiB" in problem
    assert "fits from gpu_memory_utilization 0.23" in problem
    vl = result.engines[2]
    assert vl.need_bytes > vl.given_bytes and vl.fit_fraction == 0.23
    with pytest.raises(PlanError, match="vlm-judge"):
        result.check()
    assert [e.problem is None for e in result.engines] == [True, True, False]


def test_fractions_that_together_overfill_a_gpu_are_refused(tmp_path):
    result = plan(_judges(tmp_path, 0.35), parse_gpus("80GiB"))  # 0.35 + 0.3 + 0.35 = 1.0
    assert not result.ok and "GPU 0" in result.problems[0] and "vlm-judge" in result.problems[0]


def test_a_fixed_kv_cache_below_one_sequence_is_refused(tmp_path):
    result = plan(_judges(tmp_path, 0.25, kv_cache_memory_gib=0.25), parse_gpus("1x80GiB"))
    assert any("kv_cache_memory_gib 0.25" in p and "vlm-judge" in p for p in result.problems)


def test_unset_fractions_share_the_gpu_by_the_platform_rule(tmp_path):
    qwen = _model(tmp_path, "qwen", QWEN25_7B, total_size=15231233024)
    one = ServerSettings(judges=[{"name": "j", "kind": "generative", "model": qwen}])
    assert plan(one, parse_gpus("1x24GB")).engines[0].fraction == 0.9
    two = ServerSettings(
        judges=[
            {"name": "j", "kind": "generative", "model": qwen},
            {"name": "rm", "kind": "classifier", "model": qwen},
        ]
    )
    on_one = plan(two, parse_gpus("1x80GiB"))
    assert [e.fraction for e in on_one.engines] == [0.45, 0.45] and on_one.ok
    on_two = plan(two, parse_gpus("2x80GiB"))
    assert [e.gpus for e in on_two.engines] == [[0], [1]] and [e.fraction for e in on_two.engines] == [
        0.9,
        0.9,
    ]
    # a 7 B model alone on a 16 GB card does not fit: named, with what it needs
    small = plan(one, parse_gpus("1x16GB"))
    assert not small.ok and "'j'" in small.problems[0]


def test_models_without_local_files_or_a_known_config_are_not_checked(tmp_path):
    settings = ServerSettings(judges=[{"name": "x", "kind": "generative", "model": "someone/unknown-model"}])
    result = plan(settings, parse_gpus("1x80GiB"))
    assert result.ok and result.unchecked and "'x'" in result.unchecked[0]


def test_gpu_sizes_are_read_as_written():
    assert parse_gpus("1x80GiB") == [80 * GiB]
    assert parse_gpus("2x80GB") == [80 * 10**9] * 2
    assert parse_gpus("141GiB, 24GiB") == [141 * GiB, 24 * GiB]
    with pytest.raises(PlanError, match="1x80GiB"):
        parse_gpus("eighty")


def _spec(name: str, tp: int = 1, gpus: list[int] | None = None) -> EngineSpec:
    return EngineSpec((name,), "m", "generate", EngineSettings(tensor_parallel_size=tp, gpus=gpus))


def test_placement_spreads_engines_by_tensor_parallel_size():
    assert place_engines([_spec("a", 2), _spec("b", 2)], 4) == [[0, 1], [2, 3]]  # not stacked on 0-1
    assert place_engines([_spec("a"), _spec("b"), _spec("c")], 2) == [[0], [1], [0]]
    # pinned engines count first; the others go where fewest engines are
    assert place_engines([_spec("a"), _spec("b", gpus=[0]), _spec("c", 2)], 3) == [[1], [0], [0, 2]]
    placement = place_engines([_spec("a"), _spec("b"), _spec("c")], 2)
    assert engines_on(placement) == [2, 1, 2]


def test_placement_refuses_what_the_gpus_cannot_hold():
    with pytest.raises(PlanError, match=r"'big'.*4 GPUs; 2 visible"):
        place_engines([_spec("big", 4)], 2)
    with pytest.raises(PlanError, match=r"'a'.*visible GPUs are 0\.\.1"):
        place_engines([_spec("a", gpus=[2])], 2)
    with pytest.raises(PlanError, match=r"'a'.*2 distinct GPUs"):
        place_engines([_spec("a", 2, gpus=[1])], 2)


def test_referee_config_check_passes_the_shipped_gpu_file_and_refuses_a_small_gpu():
    runner = CliRunner()
    ok = runner.invoke(
        app, ["config", "check", str(REPO / "deploy" / "judges.gpu.yaml"), "--gpus", "1x80GiB"]
    )
    assert ok.exit_code == 0, ok.output
    assert "fits" in ok.output and "vlm-judge" in ok.output
    small = runner.invoke(
        app, ["config", "check", str(REPO / "deploy" / "judges.gpu.yaml"), "--gpus", "1x24GiB"]
    )
    assert small.exit_code == 1 and "fits from gpu_memory_utilization" in small.output


def test_the_placement_becomes_each_engines_vllm_device_ids(tmp_path):
    from reward_server.engine import engine_args

    qwen = _model(tmp_path, "qwen", QWEN25_7B, total_size=15231233024)
    tp2 = {"tensor_parallel_size": 2}
    settings = ServerSettings(
        judges=[
            {"name": "a", "kind": "generative", "model": qwen, "engine": tp2},
            {"name": "b", "kind": "classifier", "model": qwen, "engine": tp2},
        ]
    )
    result = plan(settings, parse_gpus("4x80GiB")).check()
    args = {}
    for cfg in settings.judges:
        gpus, sharing = result.placement(cfg.name)
        kwargs, _ = engine_args(
            qwen, cfg.engine, "generate", "cuda", "auto", engines_on_device=sharing, devices=gpus
        )
        args[cfg.name] = (
            kwargs["device_ids"],
            kwargs["tensor_parallel_size"],
            kwargs["gpu_memory_utilization"],
        )
    assert args == {
        "a": ([0, 1], 2, 0.9),
        "b": ([2, 3], 2, 0.9),
    }  # two TP=2 judges no longer stack on GPUs 0-1


def test_the_check_at_start_runs_on_cuda_only_and_refuses_before_loading(tmp_path, monkeypatch):
    from reward_server import memory_plan

    settings = _judges(tmp_path, 0.2)
    assert memory_plan.check_before_loading(settings, "cpu") is None  # host RAM: the CPU build's rule
    monkeypatch.setattr(memory_plan, "visible_gpus", lambda: [])
    assert memory_plan.check_before_loading(settings, "cuda") is None  # nothing to plan for
    monkeypatch.setattr(memory_plan, "visible_gpus", lambda: parse_gpus("1x80GiB"))
    with pytest.raises(PlanError, match=r"'vlm-judge'.*fits from gpu_memory_utilization 0\.23"):
        memory_plan.check_before_loading(settings, "cuda")
