"""The command line against the real server: `referee judges` and `referee eval` on shared HH data."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import SHARED_DATA, TEST_DATA

# The shared data next to the repository when it is there; otherwise the subset shipped with the tests.
HH = SHARED_DATA / "hh_harmless_dev.jsonl"
if not HH.exists():
    HH = TEST_DATA / "hh_harmless_subset.jsonl"


def _referee(*args, url):
    env = {**os.environ, "REFEREE_URL": url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "referee.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_referee_judges_lists_the_loaded_judges(server_url):
    out = _referee("judges", url=server_url)
    assert out.returncode == 0, out.stderr
    assert "smollm2" in out.stdout and "tiny-rm" in out.stdout


def test_referee_eval_on_hh_subset(server_url, tmp_path: Path):
    report_path = tmp_path / "report.json"
    out = _referee(
        "eval", str(HH), "--limit", "12", "--order", "both", "--output", str(report_path), url=server_url
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(report_path.read_text())
    assert report["pairs"] == 12
    assert report["correct"] + report["wrong"] + report["ties"] + report["invalid"] == 12
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["position_consistency"] is not None
    shown = report["confusion"]
    assert sum(sum(row.values()) for row in shown.values()) == 12
    assert "accuracy" in out.stdout and "position consistency" in out.stdout
