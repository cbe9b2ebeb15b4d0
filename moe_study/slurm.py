"""What the `Snakefile` needs to run on SLURM (`snakemake --profile slurm`, slurm/config.yaml).

- `cluster_limits(partition)`: CPUs, memory and GPUs of the partition's smallest node (`sinfo`), so
  a job never asks for more than a node has (it would pend forever) and a CPU-only cluster is known.
- `tune_executor()`: three adjustments of the pinned executor plugin (snakemake-executor-plugin-slurm,
  requirements.txt), checked against a real SLURM in tests/test_slurm.py:
  * job names `<rule>.<run>` (e.g. `train.dense`) instead of the run's UUID;
  * status queries by job id for the submitting user, not by that UUID name, so the names are free
    (`squeue --user`, or `sacct --user` where the cluster keeps accounting);
  * status polling that backs off by 1.5x per quiet check from `init-seconds-before-status-checks`
    up to `MAX_POLL_S`, and returns to the start when a job ends (the plugin's +10 s per quiet check
    made each DAG level of a study of short jobs cost 10-40 s).
"""

from __future__ import annotations

import functools
import getpass
import os
import re
import shlex
import subprocess
from dataclasses import dataclass

MAX_POLL_S = 60


@dataclass(frozen=True)
class NodeLimits:
    cpus: int
    mem_mb: int
    gpus: int


def _gres_gpus(gres: str) -> int:
    """GPUs in a `sinfo %G` field such as `gpu:h100:8(S:0-1),shard:4` (0 for `(null)`)."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))


@functools.cache
def cluster_limits(partition: str | None = None) -> NodeLimits:
    """The smallest node of `partition` (default: the cluster's default partition)."""
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"sinfo failed ({r.returncode}): {r.stderr.strip()}")
    rows = [line.split("|") for line in r.stdout.splitlines() if line.count("|") == 3]
    if partition:
        rows = [x for x in rows if x[0].rstrip("*") == partition]
    elif any(x[0].endswith("*") for x in rows):
        rows = [x for x in rows if x[0].endswith("*")]
    if not rows:
        raise RuntimeError(f"sinfo lists no node in partition {partition or '(default)'}:\n{r.stdout}")
    return NodeLimits(cpus=min(int(x[1].rstrip("+")) for x in rows),
                      mem_mb=min(int(x[2].rstrip("+")) for x in rows),
                      gpus=min(_gres_gpus(x[3]) for x in rows))


def job_name(rule: str, wildcards) -> str:
    run = wildcards.get("run") if isinstance(wildcards, dict) else getattr(wildcards, "run", None)
    return f"{rule}.{run}" if run else rule


def tune_executor() -> bool:
    """Apply the adjustments above to the installed plugin; False when it is not installed."""
    try:
        import snakemake_executor_plugin_slurm as plugin
    except ImportError:
        return False
    if getattr(plugin, "_moe_study_tuned", False):
        return True
    user = shlex.quote(os.environ.get("USER") or getpass.getuser())
    submit, squeue, sacct = plugin.get_submit_command, plugin.query_job_status_squeue, plugin.query_job_status_sacct

    def named_submit(job, params, *args, **kwargs):
        call = submit(job, params, *args, **kwargs)
        old = f"--job-name {shlex.quote(str(params['run_uuid']))}"
        name = job_name(job.name, job.wildcards)
        return call.replace(old, f"--job-name {shlex.quote(name)}", 1)

    def by_user(query):
        def q(runid):
            return query(runid).replace(f"--name {runid}", f"--user {user}")
        return q

    plugin.get_submit_command = named_submit
    plugin.query_job_status_squeue = by_user(squeue)
    plugin.query_job_status_sacct = by_user(sacct)

    def get_interval(self):
        v = self._next_seconds_between_status_checks
        return self.workflow.remote_execution_settings.seconds_between_status_checks if v is None else v

    def set_interval(self, value):
        start = self.workflow.executor_settings.init_seconds_before_status_checks
        now = self._next_seconds_between_status_checks
        if now is None or value <= start:  # a job ended (or the first check): back to the start
            self._next_seconds_between_status_checks = value
        else:  # nothing ended: back off gently
            self._next_seconds_between_status_checks = min(max(now, start) * 1.5, MAX_POLL_S)

    plugin.Executor.next_seconds_between_status_checks = property(get_interval, set_interval)
    plugin._moe_study_tuned = True
    return True
