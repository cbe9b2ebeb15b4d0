# The DAG for Snakemake, read from the one stage registry (moe_study/registry.py) at parse time.
# `snakemake -c2` runs the study in params.yaml; `snakemake --profile slurm` runs it on a cluster
# with each stage's resources from the registry. dvc.yaml is generated from the same registry.
import json
import os
import sys

sys.path.insert(0, workflow.basedir)

from moe_study.registry import STAGES, AllRuns, Stage, gpu_slots  # noqa: E402
from moe_study.config.load import load_params  # noqa: E402
from moe_study.config.schema import ParamsError  # noqa: E402
from moe_study.slurm import tune_executor  # noqa: E402

tune_executor()  # job names, status queries and polling of the SLURM plugin (moe_study/slurm.py)

PARAMS_FILE = config.get("params", "params.yaml")
try:
    P = load_params(PARAMS_FILE)
except ParamsError as err:
    raise WorkflowError(f"invalid {PARAMS_FILE}\n{err}") from None
RUNS = sorted(P.runs)
RAW = P.model_dump(mode="json")

# GPU sharing (README "Several runs on one GPU"): `--config gpu_share=S` puts up to S shareable one-GPU jobs
# on each GPU. The jobs learn S from the environment they inherit (moe_study/train/gpu_slots.py picks the
# GPU and slot); set here, not on the command line, so the rules' code and params stay unchanged.
GPU_SHARE = int(config.get("gpu_share", os.environ.get("MOE_STUDY_GPU_SHARE") or 1))
if GPU_SHARE < 1:
    raise WorkflowError(f"gpu_share={GPU_SHARE} must be at least 1")
os.environ["MOE_STUDY_GPU_SHARE"] = str(GPU_SHARE)

wildcard_constraints:
    run="|".join(RUNS),


def _path(p: str) -> str:
    return p.rstrip("/").replace("{study}", P.study)


def _out(p: str):
    return directory(_path(p)) if p.endswith("/") else _path(p)


def _inputs(s: Stage) -> list:
    deps = []
    for d in s.deps:
        if isinstance(d, AllRuns):
            deps += expand(_path(d.pattern), run=RUNS)
        else:
            deps.append(_path(d))
    return list(s.code_source_files) + deps  # files, not kernels/: a directory's mtime moves on its own


def _param_slice(s: Stage, run: str | None) -> str:
    """The params.yaml values a stage reads, so that changing them re-runs it (rerun-trigger 'params')."""
    out = {}
    for key in s.params:
        key = key.replace("{run}", run) if run else key
        node = RAW
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return json.dumps(out, sort_keys=True)


def _executor() -> str:
    """The executor plugin this invocation runs under ("local", "slurm", "slurm-jobstep", "dryrun", ...);
    known when the DAG is built (resource callables), not yet while this file is parsed."""
    plugin = workflow.executor_plugin
    return plugin.name if plugin is not None else "local"


def _cluster():
    from moe_study.slurm import cluster_limits

    return cluster_limits(_default_resource("slurm_partition"))


def _default_resource(name: str):
    try:
        value = workflow.resource_settings.default_resources.parsed.get(name)
    except AttributeError:
        return None
    return value if isinstance(value, str) else None


def _gpu_slots_total() -> int | None:
    """The `--resources gpu_slots=N` of this invocation (None: not given)."""
    try:
        value = workflow.global_resources.get("gpu_slots")
    except AttributeError:
        return None
    value = getattr(value, "value", value)
    return value if isinstance(value, int) and value > 0 else None


def _threads(s: Stage):
    """cpus=0 in the registry means all cores: --cores locally; on a SLURM cluster the cores of the
    partition's smallest node, which also caps every other request (a job that asks for more CPUs
    than a node has pends forever). Inside the SLURM job: the CPUs it was given. Given `--resources
    gpu_slots=N` (GPU packing), a shareable job takes 1/N of the cores, else a job that takes all cores
    would keep the other slots empty."""

    def threads(wildcards) -> int:
        ex = _executor()
        if ex == "slurm":
            cap = _cluster().cpus
            return min(s.resources.cpus or cap, cap)
        if ex == "slurm-jobstep" and os.environ.get("SLURM_CPUS_PER_TASK"):
            return int(os.environ["SLURM_CPUS_PER_TASK"])
        if s.resources.cpus > 0:
            return s.resources.cpus
        try:
            cores = workflow.cores or 1
        except WorkflowError:  # no --cores given (e.g. --dag)
            return 1
        slots = _gpu_slots_total()
        if slots and s.resources.gpu_shareable:
            return max(1, cores // slots)
        return cores

    return threads


def _gpus(s: Stage):
    """GPUs of a job: none for a CPU study (train.device cpu, or auto where the cluster has no GPU);
    train runs train.gpus processes, one per GPU (torchrun); evaluate takes the registry's one."""

    def gpus(wildcards) -> int:
        n = P.train.gpus if s.name == "train" else s.resources.gpus
        if n == 0 or P.train.device == "cpu":
            return 0
        if P.train.device == "auto" and _executor() in ("slurm", "slurm-jobstep") and not _cluster().gpus:
            return 0
        return n

    return gpus


def _mem_mb(s: Stage):
    def mem_mb(wildcards) -> int:
        on_slurm = _executor() in ("slurm", "slurm-jobstep")
        return min(s.resources.mem_mb, _cluster().mem_mb) if on_slurm else s.resources.mem_mb

    return mem_mb


shell.executable("bash")

for _s in STAGES:

    rule:
        name: _s.name
        input: _inputs(_s)
        output: [_out(o) for o in _s.all_outs]
        params:
            values=(lambda wc, s=_s: _param_slice(s, wc.get("run"))),
            # bound now: shell/run bodies are evaluated at job time, when _s is the last stage
            cmd=(lambda wc, c=_s.command: c.replace("{run}", wc.get("run", ""))),
            # multi-node training: the `mpi` resource is the launcher (README, "Running on a SLURM cluster")
            launch=(lambda wc, resources: resources.get("mpi", "")),
        threads: _threads(_s)
        priority: _s.priority
        resources:
            mem_mb=_mem_mb(_s),
            runtime=_s.resources.time_min,
            # the train stage runs train.gpus processes (one per GPU) under torchrun
            gpu=_gpus(_s),
            # GPU sharing: `--config gpu_share=S --resources gpu_slots=G*S` runs up to S shareable one-GPU jobs
            # (train, evaluate) on each of G GPUs at once; counted whatever train.device (so a CPU test with a
            # fake GPU count schedules the same way)
            gpu_slots=gpu_slots(_s.resources, P.train.gpus if _s.name == "train" else _s.resources.gpus, GPU_SHARE),
        log: (f"work/logs/{_s.name}/{{run}}.log" if _s.per_run else f"work/logs/{_s.name}.log")
        message: _s.doc
        shell: "{params.launch} {params.cmd} 2> >(tee {log} >&2)"


_READ = {d.pattern if isinstance(d, AllRuns) else d for s in STAGES for d in s.deps}

rule all:
    default_target: True
    # every output of every stage, per-run intermediates included: a run whose model or train.json is
    # gone (a cancelled job, a deleted folder) is rebuilt by a plain `snakemake`, as by `dvc repro`
    input: [o for s in STAGES for o in (expand(_path(p), run=RUNS) for p in s.all_outs) for o in o]
