"""The remote-GPU plumbing on CPU: drive (snakemake for the runs without records) → pack → import → rebuild.

The promise checked end to end: the report rebuilt from the imported records alone (work/ deleted) is
byte-identical to the report the aggregate stage builds in place (summary.md, results.csv, metrics.json);
a tampered record and a record of another params identity are refused, naming the run and the field,
and nothing is written; imported runs are no longer to do.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import TINY, make_project, run

from moe_study.config.load import load_params
from moe_study.config.schema import parse_params
from moe_study.hashing import sha256_file, sha256_json
from moe_study.remote.bundle import _safe_members
from moe_study.remote.records import RecordError, check_identity, first_difference, run_params

REPORT = ("summary.md", "results.csv", "metrics.json")


def _record(p, run: str) -> dict:
    params = run_params(p, run)
    return {"study": p.study, "run": run, "params": params, "params_sha256": sha256_json(params)}


def test_identity_names_the_run_and_the_field() -> None:
    p = parse_params(TINY)
    rec = _record(p, "dense")
    check_identity(p, "dense", rec)
    other = parse_params({**TINY, "train": {**TINY["train"], "lr": 1e-3}})
    want = r"run dense: params field train\.lr differs: record 0\.003, study file 0\.001"
    with pytest.raises(RecordError, match=want):
        check_identity(other, "dense", rec)
    with pytest.raises(RecordError, match="run dense: field study is 'ci' in the record, 'x'"):
        check_identity(parse_params({**TINY, "study": "x"}), "dense", rec)
    with pytest.raises(RecordError, match="run nope: not a run of study ci"):
        check_identity(p, "nope", {**rec, "run": "nope"})
    # a run's identity holds every stage's slice up to collect (the data stages' too), not aggregate's
    assert {"corpus", "tokenizer", "dedupe", "split", "train", "eval", "runs.dense", "study"} <= set(rec["params"])
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 2}}) == "a.b"


def test_tarball_entries_that_climb_out_are_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("runs/../../evil")
        tar.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:gz") as tar, pytest.raises(RecordError, match="climbs out"):
        _safe_members(tar)


def test_drive_starts_no_batch_that_cannot_end_in_the_budget(tmp_path: Path, monkeypatch) -> None:
    import json

    import yaml

    from moe_study.remote import drive as drv

    study = {**TINY, "runs": {f"dense_s{i}": {"kind": "dense", "seed": i} for i in range(3)}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    monkeypatch.chdir(tmp_path)
    clock = [0.0]
    calls = []

    def fake_run(cmd, log, deadline):
        calls.append(cmd)
        log.write_text("")
        clock[0] += 100
        return 0, 100.0, False

    monkeypatch.setattr(drv.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(drv, "_run_until", fake_run)
    index = drv.drive(Path("study.yaml"), tmp_path / "out", budget_s=250, gpu_share=2, batch=1)
    # snakemake's own parser reads the targets and the packing settings from the command (targets after
    # --resources were once read as more resources: "dictionary update sequence element #1")
    from snakemake.cli import parse_args

    parsed = [parse_args(c[1:])[1] for c in calls]
    assert [a.targets for a in parsed] == [["work/collect/dense_s0"], ["work/collect/dense_s1"]]  # 50 s < 100 s
    assert parsed[0].resources == ["gpu_slots=2"] or parsed[0].resources == {"gpu_slots": 2}
    assert parsed[0].config == ["gpu_share=2"] or parsed[0].config == {"gpu_share": 2}
    assert index["drive"]["not_started"] == ["dense_s2"]

    calls.clear()  # --fill: batches start until the deadline (a warm machine resumes what the deadline cuts)
    clock[0] = 0.0
    index = drv.drive(Path("study.yaml"), tmp_path / "out2", budget_s=250, gpu_share=2, batch=1, fill=True)
    assert [c[1] for c in calls] == ["work/collect/dense_s0", "work/collect/dense_s1", "work/collect/dense_s2"]
    assert [m["run"] for m in json.loads((tmp_path / "out/index.json").read_text())["missing"]] == [
        "dense_s0", "dense_s1"]


@pytest.mark.slow
def test_drive_pack_import_rebuild(tmp_path: Path) -> None:
    d = make_project(tmp_path / "proj", TINY)
    study = tmp_path / "study.yaml"
    shutil.copy(d / "params.yaml", study)
    out = tmp_path / "out"
    py = "python"
    assert run([py, "-m", "moe_study.remote", "todo", "--study", str(study)], d).stdout.strip() == "dense,moe_r50"
    r = run([py, "-m", "moe_study.remote", "run", str(study), "--out", str(out), "--cores", "2", "--batch", "2",
             "--budget-s", "3000"], d)
    assert "drive: packed ['dense', 'moe_r50']" in r.stdout, r.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "records.tar.gz"]
    # the report in place, from work/collect (the aggregate stage as the DAG runs it)
    run(["snakemake", "-c2", "results/ci/summary.md"], d)
    in_place = {f: (d / "results/ci" / f).read_bytes() for f in REPORT}
    shutil.rmtree(d / "work")
    for f in REPORT:
        (d / "results/ci" / f).unlink()

    # refused, nothing written: a tampered file, a record of another lr
    with tarfile.open(out / "records.tar.gz") as tar:
        tar.extractall(tmp_path / "t", filter="data")
    (tmp_path / "t/runs/dense/record/train.json").write_text("{}")
    with tarfile.open(tmp_path / "tampered.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "t/runs", "runs")
    bad = run([py, "-m", "moe_study.remote", "import", str(tmp_path / "tampered.tar.gz"), "--study", str(study)], d,
              check=False)
    assert bad.returncode == 2 and "run dense: record/train.json does not match its sha256" in bad.stderr
    other = tmp_path / "other.yaml"
    other.write_text(study.read_text().replace("lr: 0.003", "lr: 0.002"))
    bad = run([py, "-m", "moe_study.remote", "import", str(out / "records.tar.gz"), "--study", str(other)], d,
              check=False)
    assert bad.returncode == 2 and "params field train.lr differs" in bad.stderr, bad.stderr
    assert not (d / "results/ci/records").exists()

    r = run([py, "-m", "moe_study.remote", "import", str(out / "records.tar.gz"), "--study", str(study)], d)
    assert "imported ['dense', 'moe_r50']" in r.stdout
    assert run([py, "-m", "moe_study.remote", "todo", "--study", str(study)], d).stdout.strip() == ""

    # a run that a later call ran again: the same run, another log. Refused unless --keep or --replace
    rec = tmp_path / "t/runs/dense"
    shutil.copy(d / "results/ci/records/dense/record/train.json", rec / "record/train.json")  # untampered
    (rec / "logs/train.log").write_text("the same run, trained again\n")
    meta = json.loads((rec / "RECORD.json").read_text())
    meta["files"]["logs/train.log"] = sha256_file(rec / "logs/train.log")
    (rec / "RECORD.json").write_text(json.dumps(meta))
    with tarfile.open(tmp_path / "again.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "t/runs", "runs")
    again = ["python", "-m", "moe_study.remote", "import", str(tmp_path / "again.tar.gz"), "--study", str(study)]
    kept = (d / "results/ci/records/dense/RECORD.json").read_bytes()
    bad = run(again, d, check=False)
    assert bad.returncode == 2 and "already holds another record of it" in bad.stderr and "--keep" in bad.stderr
    assert "imported nothing new" in run([*again, "--keep"], d).stdout
    assert (d / "results/ci/records/dense/RECORD.json").read_bytes() == kept
    assert run([*again, "--keep", "--replace"], d, check=False).returncode == 2  # one or the other
    assert "imported ['dense']" in run([*again, "--replace"], d).stdout
    assert (d / "results/ci/records/dense/logs/train.log").read_text() == "the same run, trained again\n"
    assert "imported ['dense']" in run([*again[:4], str(out / "records.tar.gz"), *again[5:], "--replace"], d).stdout
    assert (d / "results/ci/records/dense/RECORD.json").read_bytes() == kept
    run([py, "-m", "moe_study.remote", "rebuild", "--study", str(study)], d)
    for f in REPORT:
        assert (d / "results/ci" / f).read_bytes() == in_place[f], f
    # the stage's own option reads the same records
    run([py, "-m", "stages.aggregate", "--params", str(study), "--collect-dir", "results/ci/records"], d)
    assert (d / "results/ci/summary.md").read_bytes() == in_place["summary.md"]

    # a study still running: the complete report refuses a missing run, --partial reports what is there
    shutil.rmtree(d / "results/ci/records/moe_r50")
    bad = run([py, "-m", "moe_study.remote", "rebuild", "--study", str(study)], d, check=False)
    assert bad.returncode == 2 and "moe_r50" in bad.stderr
    r = run([py, "-m", "moe_study.remote", "rebuild", "--study", str(study), "--partial"], d)
    summary = (d / "results/ci/partial/summary.md").read_text()
    assert summary.startswith("**PARTIAL REPORT: 1 of 2 runs have a record**") and "not yet run: moe_r50" in summary
    assert "| dense |" in summary and "| moe_r50 |" not in summary
    assert (d / "results/ci/summary.md").read_bytes() == in_place["summary.md"]  # the full report untouched


def test_a_loan_runs_a_grid_then_its_followers(tmp_path: Path, monkeypatch) -> None:
    """`run --choose-lr`: the driver runs the lr grid, carries its choice into the follower's lr (its copy of
    the study file) and runs the follower in the same call; at home a plain import refuses the follower's
    record (its lr is not the study file's yet), `import --choose-lr` makes the same choice from the grid's
    records first and then takes it. Snakemake is faked here (each batch writes its runs' collect rows;
    the real driver path is test_drive_pack_import_rebuild)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from moe_study.remote import drive as drv
    from moe_study.remote.__main__ import import_records
    from moe_study.remote.records import RecordError
    from moe_study.remote.todo import todo_runs

    head = {k: v for k, v in TINY.items() if k != "runs"}
    runs = ("runs:\n"
            "  dense_s0: {kind: dense, seed: 0, group: dense, lr_grid: [3.0e-3, 1.0e-2]}\n"
            "  dense_s1: {kind: dense, seed: 1, group: dense, lr: 5.0e-3}  # placeholder: not a grid value\n")
    device, home = tmp_path / "device.yaml", tmp_path / "home.yaml"
    for f in (device, home):
        f.write_text(yaml.safe_dump(head, sort_keys=False) + runs)
    monkeypatch.chdir(tmp_path)
    assert todo_runs(load_params(home)) == ["dense_s0_lr1e-2", "dense_s0_lr3e-3"]  # the follower waits
    validation = {"dense_s0_lr3e-3": 2.5, "dense_s0_lr1e-2": 2.1, "dense_s1": 2.3}  # 1e-2 wins
    calls = []

    def fake_run(cmd, log, deadline):  # what snakemake leaves: each target run's collect rows
        targets = [c.split("/")[-1] for c in cmd if c.startswith("work/collect/")]
        calls.append(targets)
        p = load_params(Path("params.yaml"))
        for r in targets:
            d = Path("work/collect") / r
            d.mkdir(parents=True)
            row = {"run_id": r, "study": "ci", "grp": "dense", "lr": p.runs[r].lr, "validation_loss": validation[r],
                   "validation_bpb": 1.0, "val_loss": 1.0, "val_bpb": 1.0}
            pq.write_table(pa.Table.from_pylist([row]), d / "run.parquet")
            (Path("work/runs") / r).mkdir(parents=True)
            (Path("work/runs") / r / "train.json").write_text(json.dumps({"wall_seconds": 1.0, "device": "cpu"}))
        log.write_text("")
        return 0, 1.0, False

    monkeypatch.setattr(drv, "_run_until", fake_run)
    index = drv.drive(device, tmp_path / "out", budget_s=100, batch=2, choose_lr=True)
    assert calls == [["dense_s0_lr1e-2", "dense_s0_lr3e-3"], ["dense_s1"]]
    assert sorted(index["runs"]) == ["dense_s0_lr1e-2", "dense_s0_lr3e-3", "dense_s1"] and not index["missing"]
    assert load_params(device).runs["dense_s1"].lr == 1e-2 and "# placeholder" in device.read_text()
    assert Path("results/ci/lr_choice.md").read_text().count("**chosen**") == 1

    tarball = tmp_path / "out/records.tar.gz"
    with pytest.raises(RecordError, match="params field runs.dense_s1.lr differs"):
        import_records(home, tarball)
    assert not Path("results/ci/records").exists()  # nothing written
    assert import_records(home, tarball, choose_lr=True) == ["dense_s0_lr1e-2", "dense_s0_lr3e-3", "dense_s1"]
    assert home.read_text() == device.read_text() and todo_runs(load_params(home)) == []


def test_a_later_call_on_a_warm_machine_sends_only_what_changed(tmp_path: Path, monkeypatch) -> None:
    """Runs an earlier call of the same loan packed unchanged are not packed again (one $OUT file is 16 MiB)."""
    from moe_study.remote import drive as drv

    monkeypatch.chdir(tmp_path)
    collect = Path("work/collect")
    for r in ("a", "b", "c"):
        (collect / r).mkdir(parents=True)
        (collect / r / "run.parquet").write_bytes(r.encode())
    assert drv.unpacked(["a", "b"], collect) == (["a", "b"], [])
    drv.remember_packed(["a", "b"], collect)
    (collect / "b" / "run.parquet").write_bytes(b"rebuilt")  # re-run since: its new record must go home
    assert drv.unpacked(["a", "b", "c", "d"], collect) == (["b", "c", "d"], ["a"])
