"""bench/gpu_session.sh on a CPU machine: its dry run (every GPU stage skipped, the summary printed
last, at most 8 flat files in $OUT: what the device tool brings back), and a forced run with the
GPU stages stubbed whose time limits are driven by a fake clock (SPFT_SESSION_CLOCK), so that no
assertion depends on how loaded the machine is."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "bench" / "gpu_session.sh").is_file())
SCRIPT = ROOT / "bench" / "gpu_session.sh"
GPU_STAGES = ("build", "gpu-tests", "bench", "memcheck", "kernel-suite", "racecheck", "rest")
STUBBED = ("build", "gpu-tests", "memcheck", "kernel-suite", "racecheck", "rest")
HANG_GUARD_S = 900  # only stops a hung script; no assertion here depends on wall time


def session_env(out: pathlib.Path, clock: pathlib.Path, **extra: str) -> dict:
    env = dict(os.environ, OUT=str(out), SPFT_PYTHON=sys.executable, SPFT_SESSION_CLOCK=str(clock),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("SPFT_SESSION_FORCE_GPU", "SPFT_SESSION_BUDGET", "SPFT_SESSION_STUBS"):
        env.pop(name, None)
    env.update(extra)
    return env


def set_clock(clock: pathlib.Path, seconds: int) -> None:
    """The session's clock, written whole (rename) so the script never reads half a number."""
    partial = clock.with_suffix(".partial")
    partial.write_text(f"{seconds}\n")
    partial.replace(clock)


def summary_lines(summary: str) -> dict:
    return {line.split()[0]: line for line in summary.splitlines()[3:] if line.strip()}


def run_session(out: pathlib.Path, *stages: str) -> subprocess.CompletedProcess:
    clock = out.parent / f"{out.name}.clock"
    set_clock(clock, 0)  # time stands still: the env stage's 30 s cannot run out, however slow
    return subprocess.run(["bash", str(SCRIPT), *stages], cwd=ROOT, env=session_env(out, clock),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the path without a GPU")
def test_dry_run_skips_the_gpu_stages_and_returns_the_summary(tmp_path):
    out = tmp_path / "out"
    result = run_session(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(entry.is_file() for entry in entries)
    summary = (out / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())  # printed last
    assert "budget 540 s, used 0 s" in summary and f"files in $OUT: {len(entries)} of 8 allowed" in summary
    lines = summary_lines(summary)
    assert lines["env"].split()[1] == "30" and " ok: " in lines["env"]
    assert re.search(r"\d+ tests collected", lines["env"])  # the sanitizer stages' test ids exist
    for stage in GPU_STAGES:
        assert lines[stage].endswith("skipped: no GPU"), lines[stage]
    assert lines["build"].split()[1] == "140" and lines["rest"].split()[1] == "rest"


def test_unknown_stage_is_refused(tmp_path):
    result = run_session(tmp_path / "out", "env", "sanitize")
    assert result.returncode == 2 and "unknown stage sanitize" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real session, not a stubbed one")
def test_forced_run_keeps_the_finished_bench_cases_when_its_time_runs_out(tmp_path):
    """GPU stages forced on the CPU, all but the bench stubbed; once the bench has written its
    first case the clock jumps to 530 s: the bench is stopped at its limit with that case kept in
    bench.jsonl, and every later stage is skipped for want of time, each with its summary line."""
    out, clock = tmp_path / "out", tmp_path / "clock"
    set_clock(clock, 0)
    env = session_env(out, clock, SPFT_SESSION_FORCE_GPU="1", SPFT_SESSION_STUBS=" ".join(STUBBED),
                      # a small layer, but enough repeats that a case lasts seconds: the clock
                      # jumps while the second case runs
                      SPFT_SESSION_BENCH_SHAPE="64 48", SPFT_SESSION_BENCH_TOKENS="16 24",
                      SPFT_SESSION_BENCH_REPEATS="200", OMP_NUM_THREADS="1")
    process = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    records = out / "bench.jsonl"
    begin = time.monotonic()
    while not (records.exists() and records.read_text().strip()):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() - begin < HANG_GUARD_S
        time.sleep(0.2)
    set_clock(clock, 530)
    stdout, _ = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == 1, stdout[-3000:]  # a stage timed out

    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(entry.is_file() for entry in entries)
    summary = (out / "summary.txt").read_text()
    assert stdout.rstrip().endswith(summary.rstrip())
    lines = summary_lines(summary)
    assert " ok: sanitizer test ids" in lines["env"]
    for stage in ("build", "gpu-tests"):
        assert lines[stage].endswith("ok: stubbed"), lines[stage]
    kept = [json.loads(line) for line in records.read_text().splitlines()]
    assert kept and all(r["median_ms"] > 0 and r["host_ms"] > 0 for r in kept)
    assert {r["tokens"] for r in kept} >= {16} and not any(r["op"] == "sddmm" for r in kept)
    assert "TIMED OUT after 100 s" in lines["bench"] and f"{len(kept)} records" in lines["bench"], lines["bench"]
    assert "copy " in lines["bench"] and json.loads((out / "ceilings.json").read_text())["copy_tb_s"] > 0
    for stage in ("memcheck", "kernel-suite", "racecheck", "rest"):
        assert "skipped: 5 s left, needs 20" in lines[stage], lines[stage]
    assert "budget 540 s, used 530 s, 10 s left" in summary


def test_stage_limits_shrink_to_what_is_left_and_stages_without_time_are_skipped(tmp_path):
    """The budget logic on a fake clock, with a 200 s budget and stubbed stages that take 130, 40
    and 10 s of it (each under its limit): after 170 s memcheck gets the 25 s that are left (200 -
    170 - the 5 s reserve) instead of its 60; after 180 s, 15 s are left, under the 20 s a stage
    needs: kernel-suite and rest are skipped."""
    out, clock = tmp_path / "out", tmp_path / "clock"
    set_clock(clock, 0)
    env = session_env(out, clock, SPFT_SESSION_FORCE_GPU="1", SPFT_SESSION_BUDGET="200",
                      SPFT_SESSION_STUBS="build:130 gpu-tests:40 memcheck:10 kernel-suite rest")
    result = subprocess.run(["bash", str(SCRIPT), "build", "gpu-tests", "memcheck", "kernel-suite", "rest"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== build: limit 140 s (200 s of the budget left)" in result.stdout
    assert "== gpu-tests: limit 60 s (70 s of the budget left)" in result.stdout
    assert "== memcheck: limit 25 s (30 s of the budget left)" in result.stdout
    lines = summary_lines((out / "summary.txt").read_text())
    assert lines["env"].endswith("skipped: not asked") and lines["bench"].endswith("skipped: not asked")
    assert [lines[stage].split()[2] for stage in ("build", "gpu-tests", "memcheck")] == ["130", "40", "10"]
    assert all(lines[stage].endswith("ok: stubbed") for stage in ("build", "gpu-tests", "memcheck"))
    for stage in ("kernel-suite", "rest"):
        assert lines[stage].endswith("skipped: 15 s left, needs 20"), lines[stage]
