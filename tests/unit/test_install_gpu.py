"""scripts/install.sh's GPU path, without installing anything: the NVIDIA driver check of the CUDA
stack that the pinned vLLM brings (``--check-driver``), run with a stand-in ``nvidia-smi`` on PATH
that reports a given driver version, as the real one does with
``--query-gpu=driver_version --format=csv,noheader``."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO

INSTALL = REPO / "scripts" / "install.sh"


def _check(tmp_path: Path, driver_lines: list[str] | None, status: int = 0) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if driver_lines is not None:
        smi = bin_dir / "nvidia-smi"
        answer = "".join(f"echo '{line}'\n" for line in driver_lines)
        smi.write_text(
            "#!/bin/sh\n"
            'case "$*" in *--query-gpu=driver_version*--format=csv,noheader*) ;; *) exit 9 ;; esac\n' + answer
        )
        smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(
        ["bash", str(INSTALL), "--check-driver"], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_floor_is_the_pinned_vllms_cuda_stack():
    pin = re.search(r'^gpu = .*"vllm>=(\d+\.\d+)\.\d+,<', (REPO / "pyproject.toml").read_text(), re.M)
    assert pin and pin.group(1) == "0.32"  # a new pin needs its CUDA stack in install.sh's cuda_stack
    text = INSTALL.read_text()
    assert "0.32)" in text and "https://download.pytorch.org/whl/cu129" in text


def test_a_driver_below_the_floor_is_refused_naming_both_versions(tmp_path):
    done = _check(tmp_path, ["470.57.02"])
    assert done.returncode == 1
    assert "NVIDIA driver 470.57.02 is below 525.60.13" in done.stderr and "vLLM 0.32" in done.stderr


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (
            ["580.82.07", "580.82.07"],
            "NVIDIA driver 580.82.07: meets vLLM 0.32's CUDA 12.9 stack",
        ),  # two GPUs
        (["575.51.03"], "meets"),
        (["550.54.15"], "warning: NVIDIA driver 550.54.15 runs CUDA 12.9 by minor version compatibility"),
        (["525.60.13"], "warning"),
    ],
)
def test_a_driver_at_or_above_the_floor_passes(tmp_path, lines, says):
    done = _check(tmp_path, lines)
    assert done.returncode == 0, done.stderr
    assert says in done.stdout


def test_no_driver_version_is_refused_and_no_nvidia_smi_is_not_checked(tmp_path):
    silent = _check(tmp_path, [""])
    assert silent.returncode == 1 and "did not report a driver version" in silent.stderr
    failing = _check(tmp_path, [], status=9)  # "NVIDIA-SMI has failed": the driver is not loaded
    assert failing.returncode == 1 and "is the driver loaded?" in failing.stderr
    (tmp_path / "none").mkdir()
    absent = _check(tmp_path / "none", None)
    assert (
        absent.returncode == 0 and "nvidia-smi not found: the NVIDIA driver is not checked" in absent.stdout
    )


def test_the_cpu_path_installs_as_before():
    """CI's path: the default extras install without PyTorch's CUDA index or vLLM's kernel step."""
    text = INSTALL.read_text()
    assert 'EXTRAS="${1:-cpu,trainer,images,dev}"' in text
    install = text.split("# torch's CUDA build for vLLM's CUDA version", 1)[1]
    cpu_branch = install.split("else\n", 1)[1].split("fi\n", 1)[0]
    assert cpu_branch.strip() == 'python -m pip install -q -e ".[${EXTRAS}]"'
