"""Every fenced code block of README.md runs as written.

`python` blocks are executed by this interpreter (the repository's virtualenv) in a subprocess, `bash` blocks by
bash with the virtualenv's `bin/` first on PATH; both in one temporary directory, in README order, so later blocks
use what earlier ones wrote (the quickstart's run, the exported bundle). `text` blocks are output, never run.

Three things are handled explicitly instead of being run verbatim:

- `pip install ...` is not run again: the environment under test was installed by that very command (`.ci/run`).
  Instead every path a pip line installs must exist in the repository, and the README's test command must be
  exactly the line `.ci/run` runs (that line is not re-run here: it is the run this test is part of).
- The serve block is started in the background and the `curl` block after it runs against it.
- A few commands are changed by SUBSTITUTIONS below, each with its reason: an hour of training, or a fixed port.

The blocks depend on each other: run the whole file (`pytest tests/test_readme.py`), not one block alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
LANGUAGES = {"python", "bash", "text"}  # text: output examples, not run
BLOCK_TIMEOUT_S = 1800

# README text -> (replacement, how many times it occurs in the README's code blocks). Only these change what runs;
# test_substitutions_match fails when the README no longer holds one, so none can silently stop applying.
SUBSTITUTIONS = {
    # The main job's 4-minute budget and 8 epochs: one short epoch still runs it end to end (data, training,
    # evaluation, the run directory that the export block below reads).
    "sasrec-jax quickstart": ("sasrec-jax quickstart --epochs 1 --max-minutes 0.3", 1),
    # Reproduce: an hour per ML-1M seed and 90 s per ML-100K seed become 12 s, one seed each, and the paper's
    # recipe (~90 epochs to early stopping) one epoch; the commands, data and flags are otherwise the README's.
    "--max-minutes 60 --seed $seed": ("--max-minutes 0.2 --seed $seed", 1),
    "--max-minutes 1.5": ("--max-minutes 0.2", 1),
    "for seed in 0 1 2; do": ("for seed in 0; do", 2),
    "--train-windows last\n": ("--train-windows last --epochs 1\n", 1),
    # The server's port: 8000 may be taken on a shared machine, so the server and curl use a free one.
    "sasrec-serve bundles/quickstart ": ("sasrec-serve bundles/quickstart --port {port} ", 1),
    "localhost:8000": ("localhost:{port}", 3),
}
SERVER = re.compile(r"^(sasrec-serve|sasrec-jax serve|python -m sasrec_serve)\s")
NEEDS_MOVIELENS = "$SASREC_DATA_DIR"


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def blocks() -> list[Block]:
    found, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: code block never closed"
        found.append(Block(start + 1, m.group(1), "\n".join(body) + "\n"))
        i += 1
    return found


def ci_command() -> str:
    """The one `pip install ...` line of .ci/run: the README's test command."""
    lines = [ln.strip() for ln in CI_RUN.read_text().splitlines() if ln.strip().startswith("pip install")]
    assert len(lines) == 1, f".ci/run should hold one `pip install` line, found {lines}"
    return lines[0]


def pip_targets(segment: str) -> list[str]:
    """What a `pip install ...` command installs: its arguments that are not options, extras removed."""
    args = shlex.split(segment, comments=True)
    assert args[:2] == ["pip", "install"], segment
    return [re.sub(r"\[[^\]]*\]$", "", a) for a in args[2:] if not a.startswith("-")]


def runnable(block: Block, port: int) -> str:
    """The block's text as it is run: pip segments dropped (see the module docstring), SUBSTITUTIONS applied."""
    text = block.text
    for old, (new, _) in SUBSTITUTIONS.items():
        text = text.replace(old, new.format(port=port))
    out = []
    for line in text.splitlines():
        if line.strip() == ci_command():
            out.append(": # the CI command: not re-run inside the run it is part of")
            continue
        if "pip install" in line:
            rest = [s for s in line.split(" && ") if not s.lstrip().startswith("pip install")]
            line = " && ".join(rest) if rest else ": # pip install: already installed by the same command"
        out.append(line)
    return "\n".join(out) + "\n"


def commands(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


BLOCKS = blocks()
RUN = [b for b in BLOCKS if b.lang != "text"]


# ---------------------------------------------------------------------------------------------------------------
# Fast checks of the README's text
# ---------------------------------------------------------------------------------------------------------------


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300, "the README is a summary: the long form belongs in docs/"


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag of a parser and its subcommands (argparse lists them only through its private _actions)."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _long_flags(sub)
        flags |= {o for o in action.option_strings if o.startswith("--")}
    return flags - {"--help"}


def test_every_cli_flag_is_in_the_readme():
    """`sasrec-jax` (every subcommand, export's options included) and `sasrec-serve`: each flag is named in the
    README, so the README and `--help` cannot drift apart."""
    from sasrec_serve.cli import build_parser as serve_parser

    from sasrec_jax.cli import build_parser

    readme = README.read_text()
    flags = _long_flags(build_parser()) | _long_flags(serve_parser())
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", readme))
    assert len(flags) > 60 and not missing, f"flags the README does not name: {missing}"
    unknown = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme)) - flags - {"--help"})
    assert not unknown, f"the README names flags that do not exist: {unknown}"


def test_every_block_is_fenced_with_a_known_language():
    assert BLOCKS, "README.md has no code blocks"
    wrong = [b.id for b in BLOCKS if b.lang not in LANGUAGES]
    assert not wrong, f"fence each block as one of {sorted(LANGUAGES)} (text for output examples): {wrong}"


def test_substitutions_match():
    code = "".join(b.text for b in RUN)
    for old, (_, count) in SUBSTITUTIONS.items():
        assert code.count(old) == count, f"SUBSTITUTIONS: {old!r} occurs {code.count(old)} times, expected {count}"


def test_test_command_is_the_ci_line():
    lines = [ln.strip() for b in RUN for ln in b.text.splitlines()]
    assert ci_command() in lines, f"the README's test command must be .ci/run's line exactly: {ci_command()}"


def test_pip_lines_install_paths_of_this_repository():
    pip_lines = [ln for b in RUN for ln in b.text.splitlines() if "pip install" in ln]
    assert pip_lines
    for line in pip_lines:
        for segment in line.split(" && "):
            if not segment.lstrip().startswith("pip install"):
                continue
            targets = pip_targets(segment.strip())
            assert targets, line
            for target in targets:
                found = (REPO / target / "pyproject.toml").is_file()
                assert found, f"{line!r}: {target} is not a distribution in this repository"


def test_one_server_block_then_curl():
    servers = [b for b in RUN if any(SERVER.match(c) for c in commands(b.text))]
    assert len(servers) == 1, "one block starts the HTTP server"
    assert len(commands(servers[0].text)) == 1, f"{servers[0].id}: the server block holds only the server command"
    later = RUN[RUN.index(servers[0]) + 1 :]
    assert any("curl" in b.text for b in later), "a curl block follows the server block"


# ---------------------------------------------------------------------------------------------------------------
# Running the blocks
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """One temporary directory for all blocks, the server once started, and whether a block failed already."""

    def __init__(self, work: Path):
        self.work, self.port, self.failed, self.server, self.server_log = work, _free_port(), None, None, None
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }

    def start_server(self, command: str) -> None:
        self.server_log = self.work / "server.log"
        with open(self.server_log, "w") as log:
            self.server = subprocess.Popen(
                ["bash", "-c", f"exec {command}"], cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                pytest.fail(f"the server exited with {self.server.returncode}:\n{self.server_log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the server was not ready in 120 s:\n{self.server_log.read_text()[-3000:]}")

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tmp_path_factory.mktemp("readme"))
    yield s
    s.stop_server()


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs(block: Block, session: Session):
    if session.failed:
        pytest.skip(f"{session.failed} failed, and the blocks after it build on it")
    script = runnable(block, session.port)
    if NEEDS_MOVIELENS in script:
        root = Path(os.environ.get("SASREC_DATA_DIR", "/nonexistent"))
        if not (root / "ml-1m" / "ml-1m.txt.gz").is_file() or not (root / "ml-100k" / "u.data").is_file():
            pytest.skip("SASREC_DATA_DIR does not hold ml-1m/ml-1m.txt.gz and ml-100k/u.data")
    session.failed = block.id  # until it passed
    if block.lang == "bash" and any(SERVER.match(c) for c in commands(script)):
        (command,) = commands(script)
        session.start_server(command)
        session.failed = None
        return
    if block.lang == "python":
        argv = [sys.executable, "-c", script]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", script]
    proc = subprocess.run(
        argv, cwd=session.work, env=session.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    output = f"--- ran ---\n{script}--- stdout ---\n{proc.stdout[-5000:]}--- stderr ---\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, f"{block.id} exited with {proc.returncode}\n{output}"
    if "curl" in script:  # curl -s exits 0 on an HTTP error too: the answers must be recommendations
        assert '"fallback"' in proc.stdout and '"detail"' not in proc.stdout, output
    session.failed = None
