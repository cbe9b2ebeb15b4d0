"""Run a study's unfinished runs through Snakemake inside a time budget, then pack their records.

Why: a lent GPU machine runs one command for at most 10 minutes and forgets its disk right after, so
one call must (1) rebuild the data stages, (2) train only the runs whose records are not committed yet
(todo.todo_runs, or `--runs`), (3) stop starting runs that cannot finish before the budget, and
(4) pack what finished into $OUT, all through the pipeline's own command (`snakemake`, the DAG of
moe_study/registry.py), so a record made there is the record `snakemake` makes anywhere.

Runs go in batches (one `snakemake --keep-going` each, targets `work/collect/<run>`; a batch is
`--batch` runs, default the `--gpu-share`, so packed jobs share the GPU), the next batch taken from the
runs still to do after each one. A batch starts only if the slowest batch so far (the first includes the
data stages) fits in the time left; a batch still running at the deadline is stopped (SIGTERM to its
process group) so that the pack always happens. `--choose-lr` lets a loan run an lr grid and then the runs
that follow it (see `drive`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from moe_study.config.load import load_params
from moe_study.hashing import sha256_file
from moe_study.io import ROOT, write_json
from moe_study.remote.bundle import pack
from moe_study.remote.todo import todo_runs

PARAMS = Path("params.yaml")


def expand_study(study: Path) -> None:
    """params.yaml from the study file, as the README says (`python -m moe_study.config.load --expand`)."""
    if study.resolve() == PARAMS.resolve():
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "moe_study.config.load", "--expand", str(study)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"error: {study} does not expand:\n{r.stderr[-2000:]}")
    PARAMS.write_text(r.stdout)


def snakemake_cmd(runs: list[str], cores: int, gpu_share: int | None, extra: list[str] = ()) -> list[str]:
    # the targets come first: --config and --resources take any number of values, so a target after
    # them would be read as one more value (snakemake then fails to parse "work/collect/<run>")
    cmd = ["snakemake", *[f"work/collect/{r}" for r in runs], "--cores", str(cores), "--keep-going",
           "--scheduler", "greedy", "--printshellcmds"]
    if gpu_share:
        cmd += ["--config", f"gpu_share={gpu_share}", "--resources", f"gpu_slots={gpu_share}"]
    return cmd + list(extra)


def _run_until(cmd: list[str], log: Path, deadline: float) -> tuple[int, float, bool]:
    """(exit code, seconds, stopped at the deadline)."""
    t = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # snakemake and its jobs: our own process group
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            stopped = True
    return rc, time.monotonic() - t, stopped


def drive(study: Path, out: Path, runs: list[str] | None = None, budget_s: float = 480, cores: int | None = None,
          gpu_share: int | None = None, batch: int | None = None, snakemake_args: list[str] = (),
          choose_lr: bool = False, fill: bool = False) -> dict[str, Any]:
    """`runs` (default: todo.todo_runs, recomputed after every batch) in batches of `batch` runs.

    `choose_lr`: before each batch, the lr grids finished so far (records, or work/collect here) are
    carried to the runs that follow them (moe_study.remote.lr_choice, written into this machine's copy
    of the study file), so one loan can run a grid and then its followers; at home, `import --choose-lr`
    makes the same choice from the same records before it imports the followers' records.

    `fill`: start batches until the deadline, even one that cannot end in the time left: on a machine
    that stays warm for the next call (work/ kept), a run cut at the deadline resumes there from its last
    checkpoint (train.checkpoint_every), so the call's last minutes are not left idle."""
    t0 = time.monotonic()
    deadline = t0 + budget_s
    collect = Path("work/collect")

    def current() -> Any:
        if choose_lr:
            from moe_study.remote.lr_choice import choose

            print("drive: choose-lr:", " ".join(choose(study, write=True, collect=collect).splitlines()[-2:]),
                  flush=True)
        expand_study(study)
        return load_params(PARAMS)

    p = current()
    if runs is not None:
        unknown = sorted(set(runs) - set(p.runs))
        if unknown:
            raise SystemExit(f"error: runs {unknown} are not in {study} (runs: {', '.join(sorted(p.runs))})")

    def todo() -> list[str]:
        return [r for r in (runs if runs is not None else todo_runs(p, collect=collect)) if r not in attempted]

    cores = cores or os.cpu_count() or 1
    size = batch or gpu_share or 1
    logs_dir = Path("work/logs")
    logs_dir.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    attempted: list[str] = []
    slowest = 0.0
    print(f"drive: study {p.study}, {len(todo())} runs to do now, batches of {size}, budget {budget_s:.0f} s",
          flush=True)
    while b := todo()[:size]:
        left = deadline - time.monotonic()
        if done and (left < 5 if fill else slowest > left):
            print(f"drive: stop: {left:.0f} s left, a batch took up to {slowest:.0f} s", flush=True)
            break
        cmd = snakemake_cmd(b, cores, gpu_share, list(snakemake_args))
        print("drive:", " ".join(cmd), flush=True)
        log = logs_dir / f"snakemake-{len(done)}.log"
        rc, secs, stopped = _run_until(cmd, log, deadline)
        print(log.read_text()[-3000:], flush=True)
        slowest = max(slowest, secs)
        done.append({"runs": b, "command": " ".join(cmd), "rc": rc, "seconds": round(secs, 1), "stopped": stopped})
        attempted += b
        note = " (stopped at the deadline)" if stopped else ""
        print(f"drive: batch {len(done) - 1} {b}: rc {rc}, {secs:.0f} s{note}", flush=True)
        if stopped:
            break
        if choose_lr:
            p = current()
    extra = {"budget_s": budget_s, "batches": done, "not_started": todo(), "choose_lr": choose_lr,
             "cores": cores, "gpu_share": gpu_share, "drive_seconds": round(time.monotonic() - t0, 1)}
    to_pack, skipped = unpacked(attempted, collect)
    extra["packed_by_an_earlier_call"] = skipped
    index = pack(p, to_pack, out, extra=extra, logs=sorted(logs_dir.glob("snakemake-*.log")))
    remember_packed(index["runs"], collect)
    print(f"drive: packed {sorted(index['runs'])} into {out}/records.tar.gz "
          f"({index['tarball_bytes'] / 2**20:.2f} MiB); missing {[m['run'] for m in index['missing']]}"
          f"{f'; already sent by an earlier call here: {skipped}' if skipped else ''}", flush=True)
    return index


PACKED = Path("work/remote/packed.json")  # on the lent machine: what earlier calls of this loan sent home


def unpacked(runs: list[str], collect: Path) -> tuple[list[str], list[str]]:
    """(runs to pack, runs an earlier call on this machine already packed unchanged): a warm machine keeps
    work/, so each later call re-targets the finished runs (Snakemake finds them up to date); sending their
    records again would only fill the 16 MiB that $OUT returns per file."""
    sent = _sent()
    fresh, again = [], []
    for r in runs:
        f = collect / r / "run.parquet"
        (again if f.is_file() and sent.get(r) == sha256_file(f) else fresh).append(r)
    return fresh, again


def _sent() -> dict[str, str]:
    """run -> sha256 of the run.parquet an earlier call of this loan packed."""
    return json.loads(PACKED.read_text()) if PACKED.is_file() else {}


def remember_packed(runs: Any, collect: Path) -> None:
    sent = _sent() | {r: sha256_file(collect / r / "run.parquet") for r in runs}
    write_json(PACKED, sent)  # atomic_path makes the folder
