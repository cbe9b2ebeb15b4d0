"""The stage registry: the only description of the DAG.

`dvc.yaml` is generated from it (`python -m moe_study.registry --write`; a test fails when the
committed file drifts), and the `Snakefile` reads it at parse time. Each stage names its inputs,
outputs, the params.yaml sections it reads, its command and its resources, so a cluster profile
(`snakemake --profile slurm`) needs nothing beyond what is here.

Paths may hold `{run}` (per-run stages fan out over params.yaml `runs`: DVC `foreach`, Snakemake
wildcards) and `{study}` (from params.yaml `study`). A dependency wrapped in `AllRuns` means
"this path for every run": Snakemake expands it, DVC depends on its parent directory.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moe_study.codebase import _expand as expand_dir  # the files files_hash reads; one definition
from moe_study.codebase import code_files, stage_module
from moe_study.io import ROOT


@dataclass(frozen=True)
class Resources:
    cpus: int = 1
    mem_mb: int = 2000
    gpus: int = 0
    time_min: int = 30
    # one-GPU jobs of this stage may share a GPU with others (the study's small runs leave an H200 mostly
    # idle): they take one of its `gpu_share` slots instead of the whole GPU (see gpu_slots)
    gpu_shareable: bool = False


def gpu_slots(r: Resources, gpus: int, share: int) -> int:
    """The `gpu_slots` a job takes when each GPU has `share` slots (Snakefile resource; `snakemake
    --config gpu_share=S --resources gpu_slots=G*S` packs up to S shareable one-GPU jobs on each of G GPUs).

    No GPU: 0. A shareable one-GPU job: 1 slot. Anything else (several GPUs, or a stage that needs a GPU to
    itself): all slots of its GPUs."""
    if gpus <= 0:
        return 0
    if share < 1:
        raise ValueError(f"gpu_share={share} must be at least 1")
    return 1 if r.gpu_shareable and gpus == 1 else gpus * share


@dataclass(frozen=True)
class AllRuns:
    """A dependency on `pattern` (which contains `{run}`) for every run in params.yaml."""

    pattern: str

    @property
    def parent(self) -> str:
        head = self.pattern.split("{run}")[0]
        return head.rstrip("/") if head.endswith("/") else str(Path(head).parent)


Dep = str | AllRuns


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    deps: tuple[Dep, ...]
    outs: tuple[str, ...]  # a trailing "/" marks a directory output
    params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # small JSON outputs, not cached by DVC, shown by `dvc metrics`
    plots: tuple[str, ...] = ()  # CSV curves (step, loss, ...), shown by `dvc plots show`; "dir/": dvclive TSVs
    # metrics DVC caches (dvclive's summary): under the git-ignored work/, yet `dvc exp show` reads them
    # per experiment from the cache
    cached_metrics: tuple[str, ...] = ()
    per_run: bool = False
    uncached: bool = False  # outputs committed to git (results/), not stored in the DVC cache
    resources: Resources = field(default_factory=Resources)
    # the scheduler's preference among ready jobs (Snakemake `priority`, higher first): finishing a trained
    # run (evaluate, export, collect) before starting another train, so that a study stopped by a time
    # limit (a lent GPU's 10-minute call, a SLURM allocation) leaves whole runs, not only trained models
    priority: int = 0

    @property
    def module(self) -> str:
        return stage_module(self.name)

    @property
    def command(self) -> str:
        return f"python -m {self.module}" + (" --run {run}" if self.per_run else "")

    @property
    def dvc_command(self) -> str:
        """DVC's `cmd`: no run name on it. DVC substitutes `${key}` into a shell line *before* any of
        our validation runs (a run named `x;touch PWNED` would run `touch`); DVC also puts the stage
        address (`plan@<run>`) in DVC_STAGE, which per_run_main reads as a plain string instead."""
        return f"python -m {self.module}"

    @property
    def code_files(self) -> tuple[str, ...]:
        """The source files that can change this stage's outputs: its entry point's import closure
        (moe_study.codebase), all of kernels/ as one directory where a kernel is reached."""
        return code_files(self.module)

    @property
    def code_source_files(self) -> tuple[str, ...]:
        """`code_files` with kernels/ replaced by the files in it that the code identity hashes.

        Snakemake's inputs are these, not the directory: a directory's own mtime moves whenever an entry
        appears in it (Python's `__pycache__/` on first import) or a copy recreates it. On the GPU machine
        it moved between two calls of one loan, and Snakemake re-ran every finished training run ("Updated
        input files: kernels") though no source had changed. A file's mtime moves only when the file is
        written. (DVC hashes content; .dvcignore keeps bytecode out of its hash of kernels/.)"""
        return tuple(p.relative_to(ROOT).as_posix() for rel in self.code_files for p in expand_dir(ROOT / rel))

    @property
    def all_outs(self) -> tuple[str, ...]:
        return self.outs + self.metrics + self.cached_metrics + self.plots


CPU_ALL = 0  # resources.cpus 0 = "all the cores of the node" (tokenize, dedupe scale with cores)

STAGES: tuple[Stage, ...] = (
    Stage(
        name="corpus",
        doc="Build the document table (id, source, text) from the sources in params.yaml.",
        deps=(),
        outs=("work/corpus/",),
        params=("corpus",),
        metrics=("work/metrics/corpus.json",),
        resources=Resources(cpus=1, mem_mb=4000, time_min=60),
    ),
    Stage(
        name="tokenize",
        doc="Train (or load) a byte-level BPE tokenizer and encode every document into token shards.",
        deps=("work/corpus/",),
        outs=("work/tokens/",),
        params=("tokenizer",),
        metrics=("work/metrics/tokenize.json",),
        resources=Resources(cpus=CPU_ALL, mem_mb=8000, time_min=240),
    ),
    Stage(
        name="dedupe",
        doc="Exact and MinHash-LSH near-duplicate clusters over token n-grams; one survivor per cluster.",
        deps=("work/tokens/",),
        outs=("work/dedupe/",),
        params=("dedupe",),
        metrics=("work/metrics/dedupe.json",),
        resources=Resources(cpus=CPU_ALL, mem_mb=8000, time_min=240),
    ),
    Stage(
        name="split",
        doc="Train / validation / held-out split by duplicate cluster, so no near duplicate crosses it.",
        deps=("work/tokens/", "work/dedupe/"),
        outs=("work/split/",),
        params=("split",),
        metrics=("work/metrics/split.json",),
        resources=Resources(cpus=1, mem_mb=4000, time_min=60),
    ),
    Stage(
        name="tasks",
        doc="Zero-shot tasks from the held-out documents: sentence-final-word cloze and 4-way continuation choice.",
        deps=("work/tokens/", "work/split/"),
        outs=("work/tasks/",),
        params=("eval", "model"),  # whole sections: DVC wants listed keys present in params.yaml
        resources=Resources(cpus=1, mem_mb=2000, time_min=30),
    ),
    Stage(
        name="plan",
        doc="Equal-resource configuration of one run: architecture, N, N_active, tokens, steps, epochs.",
        deps=("work/split/",),
        outs=("work/runs/{run}/plan.json",),
        # `train` whole (batch_size, vary_data_order): DVC wants listed keys present in params.yaml, and
        # the section is (train reads it); an edit re-plans, and an unchanged plan.json re-runs nothing
        params=("seed", "budget", "model", "tokenizer.vocab_size", "train", "runs.{run}"),
        per_run=True,
        resources=Resources(cpus=1, mem_mb=1000, time_min=5),
    ),
    Stage(
        name="plan_table",
        doc="The study's plan as one table: architecture, N, r_a, FLOPs/token, tokens, epochs of every run.",
        deps=(),
        outs=("results/{study}/plan.parquet", "results/{study}/plan.md"),
        metrics=("results/{study}/plan_metrics.json",),  # git-tracked: `dvc exp show` sees the plan
        params=("study", "budget", "model", "tokenizer.vocab_size", "train.batch_size", "runs"),
        uncached=True,
        resources=Resources(cpus=1, mem_mb=1000, time_min=5),
    ),
    Stage(
        name="replay",
        doc="Epoch-replay shards for one run: seeded per-epoch permutations, packed, shared by content.",
        deps=("work/tokens/", "work/split/", "work/runs/{run}/plan.json"),
        outs=("work/runs/{run}/replay.json",),
        per_run=True,
        resources=Resources(cpus=1, mem_mb=4000, time_min=120),
    ),
    Stage(
        name="train",
        doc="Train one dense or MoE LM on its replayed token stream; save weights and the loss curve.",
        deps=(
            "work/runs/{run}/plan.json",
            "work/runs/{run}/replay.json",
            "work/tokens/",
            "work/split/",  # the loader rebuilds a missing replay epoch from tokens + split
        ),
        outs=("work/runs/{run}/model/", "work/runs/{run}/steps.parquet"),
        params=("train", "router", "runs.{run}"),
        metrics=("work/runs/{run}/train.json",),
        cached_metrics=("work/runs/{run}/dvclive/metrics.json",),
        plots=("work/runs/{run}/dvclive/plots/metrics/",),
        per_run=True,
        resources=Resources(cpus=CPU_ALL, mem_mb=16000, gpus=1, time_min=1440, gpu_shareable=True),
    ),
    Stage(
        name="evaluate",
        doc="Held-out loss, bits per byte and zero-shot task accuracy of one trained run, with 95% intervals.",
        deps=("work/runs/{run}/model/", "work/runs/{run}/plan.json", "work/tokens/", "work/split/", "work/tasks/"),
        outs=("work/eval/{run}.docs.parquet",),  # per-document scores: the aggregate's paired intervals
        params=("eval",),
        metrics=("work/eval/{run}.json",),
        per_run=True,
        priority=1,
        resources=Resources(cpus=CPU_ALL, mem_mb=8000, gpus=1, time_min=120, gpu_shareable=True),
    ),
    Stage(
        name="export",
        doc="One trained run as a Hugging Face checkpoint (Llama / Mixtral / Qwen2-MoE ...) with its tokenizer, "
            "if export.enabled.",
        deps=("work/runs/{run}/model/", "work/tokens/"),
        outs=("work/runs/{run}/hf/",),  # always holds moe_study_export.json; the checkpoint when enabled
        params=("export", "tokenizer"),
        per_run=True,
        priority=1,
        resources=Resources(cpus=1, mem_mb=4000, time_min=30),
    ),
    Stage(
        name="collect",
        doc="One run's plan, training record (audit, curve, expert load) and evaluation as Parquet rows.",
        deps=("work/runs/{run}/plan.json", "work/runs/{run}/train.json", "work/runs/{run}/steps.parquet",
              "work/eval/{run}.json", "work/eval/{run}.docs.parquet"),
        outs=("work/collect/{run}/",),
        params=("study", "runs.{run}"),
        per_run=True,
        priority=1,
        resources=Resources(cpus=1, mem_mb=1000, time_min=5),
    ),
    Stage(
        name="aggregate",
        doc="Union the runs' rows into DuckDB (tables, views); write the summary, CSV, plots and exp metrics.",
        deps=(AllRuns("work/collect/{run}/"),),
        outs=(
            "results/{study}/metrics.duckdb",
            "results/metrics.duckdb",  # the current study's copy
            "results/{study}/summary.md",
            "results/{study}/results.csv",
            "results/{study}/loss_vs_activation.png",
            "results/{study}/training_curves.png",
            "results/{study}/expert_load.png",
        ),
        metrics=("results/{study}/metrics.json",),  # git-tracked, so `dvc exp show` sees it per experiment
        params=("study", "runs"),
        uncached=True,
        resources=Resources(cpus=1, mem_mb=2000, time_min=10),
    ),
)

BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


# -------------------------------------------------------------------------------- DVC rendering
def _dvc_path(p: str) -> str:
    return p.rstrip("/").replace("{run}", "${key}").replace("{study}", "${study}")


def _dvc_params(params: tuple[str, ...]) -> list[str]:
    return [p.replace("{run}", "${key}") for p in params]


def render_dvc(stages: tuple[Stage, ...] = STAGES) -> dict:
    out: dict[str, dict] = {}
    for s in stages:
        deps = [_dvc_path(d.parent if isinstance(d, AllRuns) else d) for d in s.deps]
        body: dict = {"cmd": s.dvc_command, "deps": list(s.code_files) + deps}
        if s.params:
            body["params"] = _dvc_params(s.params)
        outs: list = [({_dvc_path(o): {"cache": False}} if s.uncached else _dvc_path(o)) for o in s.outs]
        # DVC shows a metric per experiment only if git tracks the file: stats under the ignored
        # work/ are plain outputs (`dvc metrics show work/metrics/dedupe.json` reads them), the study's
        # metrics under results/ are DVC metrics (`dvc exp show`). Everything under work/ is cached, so
        # a queued experiment's temporary workspace restores unchanged stages from the cache instead of
        # rebuilding the whole DAG from the corpus.
        tracked = [m for m in s.metrics if not m.startswith("work/")]
        outs += [_dvc_path(m) for m in s.metrics if m.startswith("work/")]
        if outs:
            body["outs"] = outs
        metrics = [{_dvc_path(m): {"cache": False}} for m in tracked] + [_dvc_path(m) for m in s.cached_metrics]
        if metrics:
            body["metrics"] = metrics
        if s.plots:
            body["plots"] = [{_dvc_path(p): ({"x": "step"} if p.endswith("/") else {"x": "step", "y": "loss"})}
                             for p in s.plots]
        body["desc"] = s.doc
        out[s.name] = {"foreach": "${runs}", "do": body} if s.per_run else body
    return {"stages": out}


HEADER = (
    "# GENERATED by `python -m moe_study.registry --write` from moe_study/registry.py: do not edit by hand.\n"
    "# Per-run stages fan out over `runs` in params.yaml (foreach). See README.md.\n"
)


def dvc_yaml_text() -> str:
    return HEADER + yaml.safe_dump(render_dvc(), sort_keys=False, width=120)


README_BEGIN, README_END = "<!-- stage table: generated from moe_study/registry.py -->", "<!-- end of stage table -->"


def readme_table() -> str:
    """The README's stage table, rendered from the registry so the docs cannot drift."""
    rows = [README_BEGIN, "| stage | module | what it does | outputs |", "|---|---|---|---|"]
    for s in STAGES:
        name = f"{s.name}@run" if s.per_run else s.name
        outs = ", ".join(f"`{o}`" for o in s.all_outs)
        rows.append(f"| {name} | `stages/{s.name}.py` | {s.doc} | {outs} |")
    return "\n".join([*rows, README_END])


def readme_text(current: str) -> str:
    head, rest = current.split(README_BEGIN, 1)
    return head + readme_table() + rest.split(README_END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="regenerate dvc.yaml and the README stage table")
    ap.add_argument("--check", action="store_true", help="exit 1 if either is stale")
    a = ap.parse_args(argv)
    readme = ROOT / "README.md"
    targets = {ROOT / "dvc.yaml": dvc_yaml_text(), readme: readme_text(readme.read_text())}
    if a.write:
        for target, text in targets.items():
            target.write_text(text)
            print(f"wrote {target}")
    elif a.check:
        stale = [t.name for t, text in targets.items() if not t.exists() or t.read_text() != text]
        if stale:
            print(f"{', '.join(stale)} stale: run `python -m moe_study.registry --write`", file=sys.stderr)
            return 1
        print("dvc.yaml and README.md are up to date")
    else:
        for s in STAGES:
            print(f"{s.name:10s} {'per-run ' if s.per_run else ''}{s.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
