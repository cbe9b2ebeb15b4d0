# The DAG for Snakemake, read from the one stage registry (moe_study/registry.py) at parse time.
# `snakemake -c2` runs the study in params.yaml; `snakemake --profile slurm` runs it on a cluster
# with each stage's resources from the registry. dvc.yaml is generated from the same registry.
import json
import sys

sys.path.insert(0, workflow.basedir)

from moe_study.registry import STAGES, AllRuns, Stage, gpu_slots  # noqa: E402
from moe_study.config.load import load_params  # noqa: E402
from moe_study.config.schema import ParamsError  # noqa: E402

PARAMS_FILE = config.get("params", "params.yaml")
try:
    P = load_params(PARAMS_FILE)
except ParamsError as err:
    raise WorkflowError(f"invalid {PARAMS_FILE}\n{err}") from None
RUNS = sorted(P.runs)
RAW = P.model_dump(mode="json")

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
    return list(s.code_files) + deps


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


def _cores(s: Stage) -> int:
    """cpus=0 in the registry means all cores: --cores locally (a cluster profile uses set-threads)."""
    if s.resources.cpus > 0:
        return s.resources.cpus
    try:
        return workflow.cores or 1
    except WorkflowError:  # no --cores given (e.g. --dag, or a cluster run without set-threads)
        return 1


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
        threads: _cores(_s)
        resources:
            mem_mb=_s.resources.mem_mb,
            runtime=_s.resources.time_min,
            # the train stage runs train.gpus processes (one per GPU) under torchrun
            gpu=(0 if P.train.device == "cpu" else P.train.gpus if _s.name == "train" else _s.resources.gpus),
            # GPU sharing: `--config gpu_share=S --resources gpu_slots=G*S` runs up to S shareable one-GPU jobs
            # (train, evaluate) on each of G GPUs at once; counted whatever train.device (so a CPU test with a
            # fake GPU count schedules the same way)
            gpu_slots=gpu_slots(_s.resources, P.train.gpus if _s.name == "train" else _s.resources.gpus,
                                         int(config.get("gpu_share", 1))),
        log: (f"work/logs/{_s.name}/{{run}}.log" if _s.per_run else f"work/logs/{_s.name}.log")
        message: _s.doc
        shell: "{params.cmd} 2> >(tee {log} >&2)"


_READ = {d.pattern if isinstance(d, AllRuns) else d for s in STAGES for d in s.deps}

rule all:
    default_target: True
    # every study-level output committed under results/ (the aggregate's and the plan table), and the
    # per-run outputs no stage reads (export@run's), so both engines run the same DAG
    input:
        [_out(o) for s in STAGES if s.uncached for o in s.all_outs]
        + [_path(o).replace("{run}", r) for s in STAGES if s.per_run and not set(s.all_outs) & _READ
           for o in s.all_outs for r in RUNS]
