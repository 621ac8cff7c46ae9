"""Every code block of the user documentation runs as written (README.md, CONTRIBUTING.md).

- A ```python block runs in a fresh namespace, on the CPU, in an empty temporary directory (files
  it writes go there). A block preceded by ``<!-- continues -->`` runs in the namespace of the
  python block before it (the text says so too, e.g. "continuing the example above"); a chain of
  such blocks is one test. A block preceded by ``<!-- fragment: reason -->`` is not run, and the
  reason must be given.
- A ```bash block: every ``spft-bench`` command is parsed by spft-bench's own argument parser
  (nothing runs); a ``python -m pytest`` command names paths that exist; ``python FILE`` and
  ``bash FILE`` name files that exist (``bash -n`` checks a script's syntax). Commands run from
  the checkout's root use ``.venv/bin/...`` as the quick start makes it (a bare ``spft-bench`` is
  not on PATH there).

No network: the examples build tiny models from configs.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "CONTRIBUTING.md")
MARKER = re.compile(r"<!--\s*(continues|fragment)\s*(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    document: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str = ""  # "continues", "fragment" or ""
    reason: str = ""
    chain: list = field(default_factory=list)  # continuation blocks run after this one

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def read_blocks(document: str) -> list[Block]:
    """The fenced blocks of ``document`` in order, with the marker comment right before each."""
    path = ROOT / document
    return parse_blocks(document, path.read_text()) if path.exists() else []


def parse_blocks(document: str, text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, inside, marker = [], None, ("", "")
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if inside is None:
            found = MARKER.search(line)
            if found:
                marker = (found.group(1), found.group(2) or "")
            elif fence:
                inside = Block(document, number, fence.group(1), "", *marker)
                marker = ("", "")
            elif line.strip():
                marker = ("", "")  # a marker applies only to the block right after it
        elif line.startswith("```"):
            blocks.append(inside)
            inside = None
        else:
            inside.code += line + "\n"
    assert inside is None, f"{document}: unclosed code block at line {inside.line}"
    return blocks


def python_chains(documents=DOCUMENTS, reader=read_blocks) -> list[Block]:
    """Python blocks: each runnable one a head with its ``<!-- continues -->`` blocks in
    ``chain``, and each fragment (skipped by the test, with its reason)."""
    chains = []
    for document in documents:
        previous = None
        for block in reader(document):
            if block.language != "python":
                continue
            if block.marker == "continues":
                assert previous is not None, f"{block.where}: '<!-- continues -->' with no runnable python block before it"
                previous.chain.append(block)
            elif block.marker == "fragment":
                chains.append(block)  # reported as a skip, with its reason
                previous = None
            else:
                chains.append(block)
                previous = block
    return chains


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in read_blocks(document)]


def test_blocks_are_marked_sensibly():
    blocks = all_blocks()
    assert any(b.language == "python" for b in blocks), "no python block found in the documentation"
    for block in blocks:
        assert block.language in ("python", "bash", "text", ""), f"{block.where}: unknown block language {block.language!r}"
        if block.marker == "fragment":
            assert block.reason, f"{block.where}: a fragment marker must give its reason ('<!-- fragment: why -->')"
        if block.marker and block.language != "python":
            raise AssertionError(f"{block.where}: markers apply to python blocks only")


@pytest.mark.parametrize("head", python_chains(), ids=lambda b: b.where)
def test_python_block_runs(head: Block, tmp_path, monkeypatch):
    if head.marker == "fragment":
        pytest.skip(f"{head.where} is a fragment: {head.reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPFT_PROGRESS", "0")
    import torch

    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    for block in [head] + head.chain:
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - the block's own error, with where it is
            raise AssertionError(f"{block.where} fails as written: {type(error).__name__}: {error}") from error


# --- bash blocks ------------------------------------------------------------------------------


def _commands(code: str) -> list[list[str]]:
    """Each simple command of a bash block as words (continuations joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|``)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words + [";"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_spft_bench(argv: list[str]) -> argparse.Namespace:
    """spft-bench's own parser on ``argv`` (SystemExit on an error); nothing is run."""
    from spft_kernels.bench import benchmark

    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only):
        try:
            benchmark.main(argv)
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError("spft-bench did not parse its arguments")


def _check_command(words: list[str], where: str) -> None:
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
        words = words[1:]
    program, args = words[0], words[1:]
    name = os.path.basename(program)
    if program in ("cd", "export", "pip", "git") or (name == "python" and args[:2] == ["-m", "pip"]):
        return
    if name == "spft-bench":
        assert program == ".venv/bin/spft-bench", (
            f"{where}: run spft-bench as .venv/bin/spft-bench (what the quick start makes), not {program!r}"
        )
        try:
            parse_spft_bench(args)
        except SystemExit as error:
            raise AssertionError(f"{where}: spft-bench rejects {shlex.join(args)!r} (exit {error.code})") from None
        return
    if name == "python":
        if args[:2] == ["-m", "pytest"]:
            paths = [a.split("::")[0] for a in args[2:] if not a.startswith("-")]
            for path in paths:
                assert (ROOT / path).exists(), f"{where}: pytest path {path!r} does not exist"
            return
        assert args and args[0].endswith(".py"), f"{where}: unrecognised python command {shlex.join(words)!r}"
        assert (ROOT / args[0]).is_file(), f"{where}: {args[0]!r} does not exist"
        return
    if name == "bash":
        assert args and (ROOT / args[0]).is_file(), f"{where}: bash script {args[:1]} does not exist"
        check = subprocess.run(["bash", "-n", str(ROOT / args[0])], capture_output=True, text=True)
        assert check.returncode == 0, f"{where}: {args[0]} has a syntax error: {check.stderr}"
        return
    raise AssertionError(f"{where}: the test does not know how to check {shlex.join(words)!r}; teach it")


BASH_BLOCKS = [b for b in all_blocks() if b.language == "bash"]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.where)
def test_bash_block_parses(block: Block):
    commands = _commands(block.code)
    assert commands, f"{block.where}: empty bash block"
    for words in commands:
        _check_command(words, block.where)


def test_markers_apply_to_the_next_block_only():
    text = "\n".join([
        "```python", "a = 1", "```", "Continuing:", "", "<!-- continues -->", "```python", "b = a", "```",
        "<!-- fragment: needs a GPU -->", "```python", "c = undefined", "```",
        "<!-- continues -->", "Some text between: the marker is void.", "```python", "d = 4", "```",
    ])
    chains = python_chains(["doc"], lambda document: parse_blocks(document, text))
    assert [(c.line, c.marker, [k.line for k in c.chain]) for c in chains] == [(1, "", [7]), (11, "fragment", []), (16, "", [])]
    assert chains[1].reason == "needs a GPU"


def test_spft_bench_parse_catches_pseudo_syntax():
    """The checker itself: placeholders like ``[--mode a|b]`` and unknown options are refused."""
    assert parse_spft_bench(["--quick"]).quick
    for argv in (["--memory", "[--mode", "merged]"], ["--no-such-option"], ["--mode", "both"]):
        with pytest.raises(SystemExit):
            parse_spft_bench(argv)
    _check_command(["OMP_NUM_THREADS=1", ".venv/bin/spft-bench", "--quick"], "here")
    with pytest.raises(AssertionError, match="run spft-bench as .venv/bin/spft-bench"):
        _check_command(["spft-bench", "--quick"], "here")
    with pytest.raises(AssertionError, match="does not exist"):
        _check_command(["python", "examples/no_such_example.py"], "here")
