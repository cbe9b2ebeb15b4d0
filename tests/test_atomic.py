"""kill -9 while a stage writes loses nothing: the old output stays whole, leftovers are cleaned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from moe_study.io import ROOT, atomic_path, recover_interrupted

# A writer that dies by SIGKILL in the middle of replacing `dest` (a directory output).
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from moe_study.io import atomic_path
dest = Path(sys.argv[1])
with atomic_path(dest) as tmp:
    tmp.mkdir()
    (tmp / "part-0").write_text("half of a new output")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def make_output(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "part-0").write_text(text)


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_kill_9_mid_write_keeps_the_old_output(tmp_path: Path) -> None:
    dest = tmp_path / "work" / "corpus"
    make_output(dest, "complete old output")
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dest)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -signal.SIGKILL
    assert (dest / "part-0").read_text() == "complete old output"
    leftovers = [p.name for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1, leftovers  # the dead writer's unfinished output
    make_output(dest, "new output")  # the next writer of the same output cleans up after it
    assert (dest / "part-0").read_text() == "new output"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["corpus"]


def test_death_between_the_two_renames_restores_the_previous_output(tmp_path: Path) -> None:
    dest = tmp_path / "tokens"
    old = tmp_path / f".old-tokens-{socket.gethostname()}-{dead_pid()}"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    recover_interrupted(dest)
    assert (dest / "manifest.json").read_text() == "{}"
    assert not old.exists()


def test_live_writers_leftovers_are_not_touched(tmp_path: Path) -> None:
    dest = tmp_path / "split"
    mine = tmp_path / f".tmp-split-{socket.gethostname()}-{os.getppid()}-abc"  # a live process (our parent)
    mine.mkdir()
    recover_interrupted(dest)
    assert mine.exists() and not dest.exists()
