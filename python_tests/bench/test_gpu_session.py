"""bench/gpu_session.sh without a GPU (its dry run): quick, every GPU stage skipped, the summary
printed last, at most 8 flat files in $OUT (what the device tool brings back)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "bench" / "gpu_session.sh").is_file())
SCRIPT = ROOT / "bench" / "gpu_session.sh"
GPU_STAGES = ("build", "gpu-tests", "memcheck", "kernel-suite", "bench", "racecheck", "rest")


def run_session(out: pathlib.Path, *stages: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), SPFT_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("SPFT_SESSION_FORCE_GPU", None)
    env.pop("SPFT_SESSION_BUDGET", None)
    return subprocess.run(["bash", str(SCRIPT), *stages], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the path without a GPU")
def test_dry_run_skips_the_gpu_stages_and_returns_the_summary(tmp_path):
    result = run_session(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = list(tmp_path.iterdir())
    assert len(entries) <= 8 and all(entry.is_file() for entry in entries)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())  # printed last
    assert "budget 540 s" in summary and f"files in $OUT: {len(entries)} of 8 allowed" in summary
    lines = {line.split()[0]: line for line in summary.splitlines()[3:] if line.strip()}
    assert lines["env"].split()[1] == "30" and " ok: " in lines["env"]
    assert "collected" in lines["env"]  # the sanitizer stages' test ids exist
    for stage in GPU_STAGES:
        assert lines[stage].endswith("skipped: no GPU"), lines[stage]
    assert lines["build"].split()[1] == "140" and lines["rest"].split()[1] == "rest"


def test_unknown_stage_is_refused(tmp_path):
    result = run_session(tmp_path, "env", "sanitize")
    assert result.returncode == 2 and "unknown stage sanitize" in result.stderr
