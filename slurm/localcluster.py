"""A single-node SLURM on localhost, for CI and for trying the profile: `snakemake --profile slurm`
against a real slurmctld + slurmd, no cluster needed.

    python slurm/localcluster.py start DIR    # installs slurm-wlm + munge with apt-get if missing (root)
    export SLURM_CONF=DIR/slurm.conf           # what sbatch / squeue / scancel read
    python slurm/localcluster.py stop DIR     # stops the daemons by the PIDs they wrote

munged runs as user munge; slurmctld and slurmd as root (SlurmUser=root), proctrack/linuxproc,
task/none, select/cons_tres with CR_Core_Memory and no accounting storage (so `sacct` does not
work: the profile polls with `squeue`). State, spool, logs, PID files and the munge socket live
under DIR; the node has this machine's CPUs and memory, in one default partition `debug`. Ports are
picked free, so two clusters (two test sessions) can run side by side. Starts in a few seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order


class ClusterError(RuntimeError):
    pass


def install() -> None:
    """apt-get install slurm-wlm munge (root), unless their daemons are already there."""
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in ("slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        raise ClusterError("slurm-wlm and munge are not installed: apt-get install -y slurm-wlm munge (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not list(Path("/var/lib/apt/lists").glob("*_Packages")):
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512  # leave the OS some room
    raise ClusterError("no MemTotal in /proc/meminfo")


def slurm_conf(d: Path, host: str, cpus: int, mem_mb: int) -> str:
    p1, p2 = _free_port(), _free_port()
    return f"""# a one-node SLURM for tests (slurm/localcluster.py)
ClusterName=localci
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
SlurmctldPort={p1}
SlurmdPort={p2}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
MinJobAge=600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _run(cmd: list[str], **kw) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")


def env(d: Path) -> dict[str, str]:
    """The environment the SLURM client commands need (SLURM_CONF), on top of os.environ."""
    return {**os.environ, "SLURM_CONF": str(Path(d) / "slurm.conf")}


def start(d: Path, timeout: float = 60) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under `d`; wait until the node takes jobs. Returns env()."""
    install()
    d = Path(d).resolve()
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    # munged (user munge) must reach its directory, so it lives beside, in /tmp, not under `d` whose
    # parents may be private (pytest's tmp); `d/munge` points at it
    m = Path(tempfile.mkdtemp(prefix="munge-"))
    (d / "munge").unlink(missing_ok=True)
    (d / "munge").symlink_to(m)
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(slurm_conf(d, host, os.cpu_count() or 1, _mem_mb()).replace(
        f"{d}/munge/", f"{m}/"))
    # munged is strict: its key, socket, log and pid paths owned by munge, not writable by others
    shutil.copy("/etc/munge/munge.key", m / "munge.key")
    shutil.chown(m, "munge", "munge")
    shutil.chown(m / "munge.key", "munge", "munge")
    m.chmod(0o700)
    (m / "munge.key").chmod(0o600)
    _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force", f"--socket={m}/munge.socket",
          f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
          f"--seed-file={m}/munged.seed"])
    m.chmod(0o755)  # the socket must be reachable by the SLURM daemons and clients
    _link_system_conf(d)
    e = env(d)
    _run(["/usr/sbin/slurmctld", "-i", "-f", str(d / "slurm.conf")], env=e)
    _run(["/usr/sbin/slurmd", "-f", str(d / "slurm.conf")], env=e)
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=e, capture_output=True, text=True)
        state = r.stdout.strip()
        if r.returncode == 0 and state in ("idle", "mix", "alloc"):
            return e
        time.sleep(0.5)
    logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted((d / "log").glob("*.log")))
    stop(d)
    raise ClusterError(f"the SLURM node did not come up within {timeout:.0f} s (sinfo: {state!r})\n{logs}")


SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def _link_system_conf(d: Path) -> None:
    """Point /etc/slurm/slurm.conf at this cluster's file. SLURM_CONF alone is not enough: the
    executor plugin's job step drops every SLURM_* variable before its `srun`, which then reads the
    default path, as on a real cluster. Refused when that path belongs to another (live) cluster."""
    if SYSTEM_CONF.is_symlink():
        target = Path(os.readlink(SYSTEM_CONF))
        if target != d / "slurm.conf" and (target.parent / "slurmctld.pid").exists():
            raise ClusterError(f"{SYSTEM_CONF} belongs to a running test cluster in {target.parent}")
        SYSTEM_CONF.unlink()
    elif SYSTEM_CONF.exists():
        raise ClusterError(f"{SYSTEM_CONF} exists: this machine has a SLURM of its own")
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.symlink_to(d / "slurm.conf")


def stop(d: Path) -> None:
    """Stop the daemons started in `d` by the PIDs in their PID files (nothing else)."""
    d = Path(d).resolve()
    if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == d / "slurm.conf":
        SYSTEM_CONF.unlink()
    for name in DAEMONS:
        pidfile = d / ("munge" if name == "munged" else "") / f"{name}.pid"
        if not pidfile.exists():
            continue
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (ValueError, IndexError, ProcessLookupError):
            continue
        for _ in range(100):  # up to 10 s, then SIGKILL
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
    if (d / "munge").is_symlink():
        shutil.rmtree(os.readlink(d / "munge"), ignore_errors=True)
        (d / "munge").unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("dir", type=Path)
    a = ap.parse_args(argv)
    if a.action == "start":
        t = time.monotonic()
        start(a.dir)
        print(f"SLURM up in {time.monotonic() - t:.1f} s: export SLURM_CONF={a.dir.resolve()}/slurm.conf")
    else:
        stop(a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
