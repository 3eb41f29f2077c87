"""Engine primitives that need no vLLM engine: a reward model's output labels read from its config,
and the seed a CPU engine passes for sampled requests. On the real engine:
``tests/serving/test_engine_primitives.py``."""

from __future__ import annotations

from types import SimpleNamespace

from reward_server.engine import Engine, _output_labels


def test_output_labels_from_configs():
    def config(id2label, num_labels=None):
        return SimpleNamespace(id2label=id2label, num_labels=num_labels or len(id2label))

    assert _output_labels(config({0: "LABEL_0"})) is None
    assert _output_labels(config({0: "LABEL_0", 1: "LABEL_1"})) is None
    assert _output_labels(config({})) is None
    assert _output_labels(config({0: "reward"})) == ["reward"]
    assert _output_labels(config({"1": "b", "0": "a"})) == ["a", "b"]  # keys as JSON writes them
    assert _output_labels(config({0: "a"}, num_labels=2)) is None  # a name missing: none made up


def test_cpu_engines_pass_no_seed_for_sampled_requests():
    engine = Engine.__new__(Engine)
    engine._cpu = True
    assert engine._device_seed(5, 0.0) == 5  # greedy: no generator, nothing to rewind
    assert engine._device_seed(5, 0.7) is None
    assert engine._device_seed(None, 0.7) is None
    engine._cpu = False  # a GPU's generator rewinds: the seed is passed
    assert engine._device_seed(5, 0.7) == 5
