.PHONY: install demo test lint bench eval

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench:
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_throughput.py

eval:
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_hh.py
