"""A run's record: the small files the report needs, with the identity that says which run made them.

Why: a study trained on a lent machine comes home as records, not as work/ (model weights and the data
stages stay there). A record is committed under results/<study>/records/<run>/, so the summary can be
rebuilt on any CPU from git alone (moe_study.remote.rebuild) and a later loan can tell which runs are
done (moe_study.remote.todo). Its layout:

- `run.parquet`, `steps.parquet`, `expert_load.parquet` (MoE), `docs.parquet`: the collect stage's
  output as is, so `results/<study>/records` is a drop-in `collect_dir` for the aggregate;
- `record/`: plan.json, train.json, eval.json (work/eval/<run>.json), dvclive.json; `logs/`: the
  run's stage logs;
- `RECORD.json`: study, run, the run's params identity (`params`: every params.yaml value a stage up
  to collect@run reads for this run, as the Snakefile slices them; `params_sha256` its hash), the
  stages' code identity, device, torch version, wall times and the sha256 of every file above.

Import refuses a record whose study, run or params identity is not the study file's current run
(naming the run and the first differing field), or whose files do not hash to RECORD.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moe_study.config.schema import Params
from moe_study.hashing import sha256_file, sha256_json
from moe_study.io import ClearError
from moe_study.registry import STAGES

RECORD = "RECORD.json"
COLLECT_FILES = ("run.parquet", "steps.parquet", "expert_load.parquet", "docs.parquet")
# the stages whose params make a run's record (aggregate, plan_table, export are not in it)
RECORD_STAGES = ("corpus", "tokenize", "dedupe", "split", "tasks", "plan", "replay", "train", "evaluate", "collect")


class RecordError(ClearError):
    """A record that cannot be used for this study (names the run and the field)."""


def records_dir(p: Params, results: Path | None = None) -> Path:
    return (results or Path("results") / p.study) / "records"


def run_params(p: Params, run: str) -> dict[str, Any]:
    """Every params.yaml value the stages up to collect@run read for `run`, keyed as the registry names
    them (`runs.dense_s0`, `train`, ...): the same slices the Snakefile's rerun trigger compares."""
    raw = p.model_dump(mode="json")
    out: dict[str, Any] = {}
    for s in STAGES:
        if s.name not in RECORD_STAGES:
            continue
        for key in s.params:
            key = key.replace("{run}", run)
            node: Any = raw
            for part in key.split("."):
                node = node[part]
            out[key] = node
    return dict(sorted(out.items()))


def code_identity() -> dict[str, str]:
    from moe_study.codebase import stage_code_sha256

    return {s: stage_code_sha256(s) for s in RECORD_STAGES}


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The dotted path of the first value that differs between two JSON trees (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return sub
            d = first_difference(a[k], b[k], sub)
            if d:
                return d
        return None
    return None if a == b else (path or "<root>")


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<absent>"
        tree = tree[part]
    return tree


def check_identity(p: Params, run: str, record: dict[str, Any]) -> None:
    """Refuse a record that is not `run` of study `p` as the study file says it now."""
    if record.get("run") != run:
        raise RecordError(f"run {run}: RECORD.json field run is {record.get('run')!r}")
    if run not in p.runs:
        raise RecordError(f"run {run}: not a run of study {p.study} (runs: {', '.join(sorted(p.runs))})")
    if record.get("study") != p.study:
        raise RecordError(f"run {run}: field study is {record.get('study')!r} in the record, {p.study!r} "
                          "in the study file")
    want = run_params(p, run)
    if record.get("params_sha256") != sha256_json(want) or record.get("params") != want:
        field = first_difference(record.get("params"), want) or "params_sha256"
        raise RecordError(f"run {run}: params field {field} differs: record {_get(record.get('params'), field)!r}, "
                          f"study file {_get(want, field)!r} (re-run it, or fix the study file)")


def verify_files(run_dir: Path, record: dict[str, Any]) -> None:
    """Every file of the record hashes to RECORD.json, and nothing else is there."""
    run = record.get("run")
    listed = record.get("files", {})
    found = {str(f.relative_to(run_dir)) for f in run_dir.rglob("*") if f.is_file() and f.name != RECORD}
    if found != set(listed):
        extra, missing = sorted(found - set(listed)), sorted(set(listed) - found)
        raise RecordError(f"run {run}: files differ from RECORD.json (unlisted {extra}, missing {missing})")
    for rel, digest in listed.items():
        if sha256_file(run_dir / rel) != digest:
            raise RecordError(f"run {run}: {rel} does not match its sha256 in RECORD.json (tampered or corrupt)")
    if "run.parquet" not in listed:
        raise RecordError(f"run {run}: the record has no run.parquet")
    import pyarrow.parquet as pq

    row = pq.read_table(run_dir / "run.parquet", columns=["run_id", "study"]).to_pylist()
    if row != [{"run_id": run, "study": record.get("study")}]:
        raise RecordError(f"run {run}: run.parquet holds {row}, not run {run} of study {record.get('study')}")


def done_runs(p: Params, results: Path | None = None) -> list[str]:
    """The runs of `p` whose committed record is there and is the study file's current run."""
    done = []
    for run in sorted(p.runs):
        f = records_dir(p, results) / run / RECORD
        if not f.is_file():
            continue
        try:
            check_identity(p, run, json.loads(f.read_text()))
        except (RecordError, ValueError):
            continue
        done.append(run)
    return done


def make_record(p: Params, run: str, dest: Path, work: Path = Path("work"),
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy one finished run's record out of `work` into `dest` (a new directory) and write RECORD.json."""
    src = {f: work / "collect" / run / f for f in COLLECT_FILES}
    src.update({"record/plan.json": work / "runs" / run / "plan.json",
                "record/train.json": work / "runs" / run / "train.json",
                "record/dvclive.json": work / "runs" / run / "dvclive" / "metrics.json",
                "record/eval.json": work / "eval" / f"{run}.json"})
    for log in sorted((work / "logs").glob(f"*/{run}.log")):
        src[f"logs/{log.parent.name}.log"] = log
    if not (work / "collect" / run / "run.parquet").is_file():
        raise RecordError(f"run {run}: no {work}/collect/{run}/run.parquet (the run did not finish)")
    dest.mkdir(parents=True)
    files = {}
    for rel, path in src.items():
        if path.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
            files[rel] = sha256_file(dest / rel)
    train = json.loads((work / "runs" / run / "train.json").read_text())
    params = run_params(p, run)
    record = {"study": p.study, "run": run, "params": params, "params_sha256": sha256_json(params),
              "code_sha256": code_identity(), "train_wall_seconds": train.get("wall_seconds"),
              "engine": train.get("engine"), "device": train.get("device"), **(extra or {}),
              "files": dict(sorted(files.items()))}
    (dest / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record
