.PHONY: install demo test test-unit lint bench eval gpu-smoke

install:
	bash scripts/install.sh

# make demo [JUDGES=configs/judges.gpu.example.yaml]: real judges (a GPU) instead of the embedded one
demo: install
	bash scripts/demo.sh $(if $(JUDGES),--judges $(JUDGES))

test: install
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest

# the fast layer (no server, no vLLM engine, no Redis): run it on every change
test-unit:
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/unit -q

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# make bench [BENCH=throughput|groups|queue|step_budget|jobs] [JUDGES=configs/judges.gpu.example.yaml]
# JUDGES: a judges file (the server's config format) instead of the embedded CPU models; hub models
# may then be downloaded (HF_HUB_OFFLINE stays off). See BENCHMARKS.md, "On a GPU".
BENCH ?= throughput
bench:
	HF_HUB_OFFLINE=$(if $(JUDGES),0,1) .venv/bin/python benchmarks/bench_$(BENCH).py $(if $(JUDGES),--judges $(JUDGES))

eval:
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_hh.py

# make gpu-smoke [JUDGES=deploy/judges.gpu.yaml] [ARGS="--vllm-compare"]: on a GPU, serve a judges
# file, ask each judge one question per route it serves, print a pass/fail table (and with
# --vllm-compare a throughput figure against `vllm serve` of the same model). scripts/gpu_smoke.py.
gpu-smoke:
	.venv/bin/python scripts/gpu_smoke.py --judges $(or $(JUDGES),deploy/judges.gpu.yaml) $(ARGS)
