"""The catalogue of hostile and broken inputs (issue 16), one section per class.

Each case asserts what the user sees: a non-zero exit with one `error:` line naming the field or
file (no traceback), or a counted, logged skip; that nothing the user had is removed or changed;
and that no half-written output is left for a later stage to trust. The README table "What bad
input gets" lists the same classes. Kept fast: one shared upstream pipeline (corpus .. split),
in-process calls where the command line adds nothing but start-up time.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import TINY, make_project, run

from moe_study import cli
from moe_study.accounting import ConfigError, read_count_config
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError, TrainConfig, parse_params
from moe_study.hashing import IntegrityError, sha256_tree, write_file_list
from moe_study.model.lm import build_model, load_model, save_model
from moe_study.train import checkpoint, engine

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ("corpus", "tokenize", "dedupe", "split")


def stage(project: Path, name: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return run(["python", "-m", f"stages.{name}", *args], project, check=check)


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, one `error:` line, no traceback, and every needle (field or file) named."""
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    assert "Traceback" not in text, text
    assert text.count("error:") == 1, text
    for n in needles:
        assert n in text, (n, text)


def no_temp_leftovers(directory: Path) -> None:
    left = [p for p in directory.rglob(".tmp-*")] + [p for p in directory.rglob(".old-*")]
    assert not left, left


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with corpus, tokenize, dedupe and split done once for the module."""
    d = make_project(tmp_path_factory.mktemp("upstream"), TINY)
    for name in UPSTREAM:
        stage(d, name, check=True)
    return d


@pytest.fixture
def project(upstream: Path, tmp_path: Path) -> Path:
    """A private copy of `upstream` that a test may damage."""
    d = tmp_path / "p"
    shutil.copytree(upstream, d, symlinks=True)
    return d


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    return make_project(tmp_path, TINY)


# ------------------------------------------------------------------------------ 1 command injection
@pytest.mark.parametrize("name", ["dense\n", "x;touch PWNED", "$(touch PWNED)", "a b", "-rf"])
def test_a_run_name_that_could_reach_a_shell_is_refused(name: str) -> None:
    p = copy.deepcopy(TINY)
    p["runs"][name] = {"kind": "dense"}
    with pytest.raises(ParamsError, match=r"runs: run name .* must match \\A"):
        parse_params(p)


def test_a_study_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ParamsError, match="study: String should match"):
        parse_params({**copy.deepcopy(TINY), "study": "ci\n"})


def test_no_params_value_reaches_a_dvc_command_line() -> None:
    """DVC interpolates `${...}` into `cmd` before any validation: dvc.yaml's commands hold none
    (a per-run stage reads its run from DVC_STAGE)."""
    import re

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, s in stages.items():
        cmd = s.get("do", s)["cmd"]
        assert re.fullmatch(r"python -m stages\.\w+", cmd), (name, cmd)


def test_dvc_never_runs_a_hostile_run_name(project: Path) -> None:
    """Upstream cached, a run named like a shell command: DVC runs plan@<it>; nothing executes and
    the stage refuses the name."""
    p = copy.deepcopy(TINY)
    p["runs"] = {"x;touch PWNED;": {"kind": "dense"}}
    write_params(project, p)
    r = run(["dvc", "repro", "--single-item", "plan@x;touch PWNED;"], project, check=False)
    assert r.returncode != 0
    assert "run name 'x;touch PWNED;' must match" in r.stdout + r.stderr, r.stdout + r.stderr  # our stage ran
    assert not (project / "PWNED").exists() and not list(project.rglob("PWNED"))


def test_the_engines_never_start_a_command_for_a_hostile_run_name(bare: Path) -> None:
    p = copy.deepcopy(TINY)
    p["runs"]["x;touch PWNED"] = {"kind": "dense"}
    write_params(bare, p)
    r = run(["python", "-m", "moe_study.config.load"], bare, check=False)
    assert_clean_error(r, "runs: run name 'x;touch PWNED'")
    assert not (bare / "PWNED").exists()


# ----------------------------------------------------------------------------- 2 destructive output
def test_dedupe_refuses_an_output_that_is_an_existing_directory(bare: Path) -> None:
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one doc here", "another doc"]}), bare / "d.parquet")
    mine = bare / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = stage(bare, "dedupe", "--input", "d.parquet", "--output", "mine")
    assert_clean_error(r, "mine", "existing directory", "--force")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_dedupe_refuses_to_overwrite_its_input(bare: Path) -> None:
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one doc here", "another doc"]}), bare / "d.parquet")
    before = (bare / "d.parquet").read_bytes()
    assert_clean_error(stage(bare, "dedupe", "--input", "d.parquet", "--output", "./d.parquet"), "d.parquet", "input")
    assert (bare / "d.parquet").read_bytes() == before


def test_corpus_refuses_an_out_directory_it_did_not_make(bare: Path) -> None:
    home = bare / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    assert_clean_error(stage(bare, "corpus", "--out", "home"), "home", "not this command's output")
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------ 3 unsafe deserialisation
class _Payload:
    def __reduce__(self):  # what a hostile checkpoint carries: a call made while unpickling
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "ckpt" / "step_000000004"
    step.mkdir(parents=True)
    (step / "torch_state.pt").write_bytes(pickle.dumps({"model": {}, "client": _Payload()}, protocol=2))
    stub = SimpleNamespace(device=torch.device("cpu"))
    stub.load = functools.partial(engine.TorchEngine.load, stub)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.load(step, stub) is None  # skipped: a fresh start
    assert not (tmp_path / "PWNED").exists()
    assert "not a readable weights-only checkpoint" in caplog.text


def test_a_deepspeed_checkpoint_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "ds" / "mp_rank_00_model_states.pt"
    hostile.parent.mkdir()
    hostile.write_bytes(pickle.dumps({"module": {}, "client": _Payload()}, protocol=2))
    with pytest.raises(checkpoint.CheckpointError, match="not a readable weights-only checkpoint"):
        engine.ds_weights_only_load(hostile)
    assert not (tmp_path / "PWNED").exists()


def test_the_torch_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    import numpy as np

    state = {"rng": checkpoint.rng_state(), "x": np.float64(0.1), "a": np.arange(5, dtype=np.uint32)}
    torch.save(checkpoint.to_safe(state), tmp_path / "s.pt")
    back = checkpoint.from_safe(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back["x"] == state["x"] and type(back["x"]) is np.float64
    assert (back["a"] == state["a"]).all() and back["a"].dtype == np.uint32
    assert (back["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert back["rng"]["python"] == state["rng"]["python"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the engine loads onto the training device")
def test_a_client_state_loaded_onto_the_gpu_comes_back_on_the_host(tmp_path: Path) -> None:
    """The engine's torch.load uses map_location = its device; resuming on a GPU once failed in from_safe
    (numpy of a CUDA tensor) and would have in set_rng_state (CPU ByteTensor only)."""
    import numpy as np

    torch.zeros(1, device="cuda")  # CUDA initialised, so rng_state records the CUDA generators too
    state = {"rng": checkpoint.rng_state(), "a": np.arange(5, dtype=np.uint32)}
    assert "cuda" in state["rng"]
    torch.save(checkpoint.to_safe(state), tmp_path / "s.pt")
    back = checkpoint.from_safe(torch.load(tmp_path / "s.pt", map_location="cuda", weights_only=True))
    assert (back["a"] == state["a"]).all()
    assert back["rng"]["torch"].device.type == "cpu"
    assert all(t.device.type == "cpu" for t in back["rng"]["cuda"])
    checkpoint.set_rng_state(back["rng"])
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])


# --------------------------------------------------------------------------------------- 4 integrity
def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_split_table_stops_task_building(project: Path) -> None:
    flip(project / "work/split/split.parquet")
    assert_clean_error(stage(project, "tasks"), "work/split/split.parquet", "sha256")
    assert not (project / "work/tasks").exists()


def test_a_flipped_byte_in_trained_weights_is_refused(tmp_path: Path) -> None:
    arch = {"kind": "dense", "d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 8, "ffn_hidden": 32}
    model = build_model(arch, 300)
    save_model(model, tmp_path / "model", {"arch": arch, "vocab_size": 300})
    write_file_list(tmp_path / "model")
    load_model(tmp_path / "model")  # intact: loads
    flip(tmp_path / "model/model.safetensors")
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 differs"):
        load_model(tmp_path / "model")


class _FileEngine:
    """The engine interface checkpoint.save needs: writes one state file."""

    name = "torch"

    def save(self, target: Path, client: dict) -> None:
        torch.save({"client": client}, target / "torch_state.pt")


def test_a_truncated_checkpoint_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    d = tmp_path / "ckpt"
    target = checkpoint.save(d, _FileEngine(), 4, {"step": 4, "blob": torch.zeros(1000)})
    assert checkpoint.latest(d, "torch") == target
    state = target / "torch_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest(d, "torch") is None  # a fresh start, not a traceback on every retry
    assert "torch_state.pt differs from its recorded sha256" in caplog.text


# ------------------------------------------------------------------------------- 5 bounds, parsing
def params_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False) + text)
    return path


@pytest.mark.parametrize("extra, message", [
    ("seed: 4\n", "duplicate key 'seed'"),
    ("x: &bomb [1, 2]\ny: *bomb\n", "anchors (&name) are not allowed"),
])
def test_yaml_duplicates_and_aliases_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(params_text(tmp_path, extra))


@pytest.mark.parametrize("section, key, value, message", [
    ("budget", "compute", float("inf"), "budget.compute: Input should be a finite number"),
    ("budget", "params", float("nan"), "budget.params: Input should be a finite number"),
    (None, "seed", True, "seed: Input should be a valid integer"),
    ("train", "batch_size", "16", "train.batch_size: Input should be a valid integer"),
])
def test_non_finite_and_coerced_values_are_refused(section, key, value, message) -> None:
    p = copy.deepcopy(TINY)
    (p[section] if section else p)[key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(p)


def test_yaml_12_floats_still_parse(tmp_path: Path) -> None:
    text = yaml.safe_dump(TINY, sort_keys=False).replace("lr: 0.003", "lr: 3e-3")
    assert "lr: 3e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.lr == 0.003


def test_a_duplicate_key_stops_a_stage_before_it_writes(bare: Path) -> None:
    (bare / "params.yaml").write_text((bare / "params.yaml").read_text() + "seed: 9\n")
    assert_clean_error(stage(bare, "corpus"), "params.yaml", "duplicate key 'seed'")
    assert not (bare / "work").exists()


def test_an_absurd_budget_plans_but_is_refused_before_replay_builds(project: Path) -> None:
    p = copy.deepcopy(TINY)
    p["budget"]["compute"] = 1e24
    write_params(project, p)
    stage(project, "plan", "--run", "dense", check=True)  # planning a huge study stays allowed
    r = stage(project, "replay", "--run", "dense")
    assert_clean_error(r, "budget.compute", "epochs", "free")
    assert not (project / "work/runs/dense/replay.json").exists()
    assert not list((project / "work/store").rglob("epoch*"))


# -------------------------------------------------------------------------------- 6 inputs from disk
def text_source(project: Path, path: str, kind: str = "text") -> None:
    p = copy.deepcopy(TINY)
    p["corpus"]["sources"] = [{"kind": kind, "path": path}]
    write_params(project, p)


def test_symlink_loops_binary_files_and_long_lines_are_counted_skips(bare: Path) -> None:
    docs = bare / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(3):
        (docs / "sub" / f"d{i}.txt").write_text(f"An ordinary English document number {i} about apples.")
    (docs / "sub" / "loop").symlink_to("..")  # docs/sub/loop -> docs: a cycle
    (docs / "alias.txt").symlink_to("sub/d0.txt")
    (docs / "image.txt").write_bytes(bytes(range(128, 256)) * 40)  # no NUL, not text
    (docs / "long.txt").write_text("x" * 1_000_001)
    text_source(bare, "docs/**/*.txt")
    stage(bare, "corpus", check=True)
    m = json.loads((bare / "work/corpus/manifest.json").read_text())
    assert m["docs"] == 3, m
    assert m["skipped"] == {"binary_file": 1, "duplicate_path": 1, "long_line": 1}, m["skipped"]


def test_a_truncated_gz_names_the_file_and_writes_nothing(bare: Path) -> None:
    data = gzip.compress(b"".join(json.dumps({"text": f"document number {i} " * 5}).encode() + b"\n"
                                  for i in range(200)))
    (bare / "d.jsonl.gz").write_bytes(data[: len(data) // 2])
    text_source(bare, "d.jsonl.gz", kind="jsonl")
    assert_clean_error(stage(bare, "corpus"), "d.jsonl.gz", "unreadable")
    assert not (bare / "work/corpus").exists()
    no_temp_leftovers(bare / "work")


def test_a_corrupt_parquet_page_names_the_file(bare: Path) -> None:
    texts = [f"document number {i} with some words in it" for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), bare / "d.parquet", compression="none")
    data = bytearray((bare / "d.parquet").read_bytes())
    for i in range(200, 20000):
        data[i] = 0xFF  # the data page; the footer (schema) stays readable
    (bare / "d.parquet").write_bytes(bytes(data))
    text_source(bare, "d.parquet", kind="parquet")
    assert_clean_error(stage(bare, "corpus"), "d.parquet")
    assert not (bare / "work/corpus").exists()
    no_temp_leftovers(bare / "work")


def test_a_file_vanishing_mid_read_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_study.config.schema import CorpusConfig
    from moe_study.data import corpus

    (tmp_path / "a.txt").write_text("An ordinary English document about pears and plums.")
    real = corpus.resolve_files
    monkeypatch.setattr(corpus, "resolve_files", lambda *a: [*real(*a), tmp_path / "gone.txt"])
    monkeypatch.setattr(corpus, "files_digest", lambda files, root: "x")
    cfg = CorpusConfig(sources=[{"kind": "text", "path": "a.txt"}])
    with pytest.raises(corpus.CorpusError, match="gone.txt: vanished while the corpus was being read"):
        corpus.build_corpus(cfg, tmp_path / "out", None, root=tmp_path)
    assert not (tmp_path / "out").exists()
    no_temp_leftovers(tmp_path)


# ------------------------------------------------------------------------------ 7 both engines at once
@pytest.fixture
def fake_snakemake() -> subprocess.Popen:
    """A live process whose argv[0] is `snakemake` (the lock only looks at names and pids)."""
    proc = subprocess.Popen(["bash", "-c", "exec -a snakemake sleep 60"])
    yield proc
    proc.kill()
    proc.wait()


def hold_lock(directory: Path, proc: subprocess.Popen) -> None:
    (directory / "work.lock").write_text(json.dumps(
        {"engine": "snakemake", "pid": proc.pid, "host": socket.gethostname(), "stage": "tokenize"}))


def test_a_stage_refuses_while_another_engine_holds_work(bare: Path, fake_snakemake: subprocess.Popen) -> None:
    hold_lock(bare, fake_snakemake)
    r = run(["bash", "-c", "exec -a dvc bash -c 'python -m stages.corpus; exit $?'"], bare, check=False)
    assert_clean_error(r, "snakemake run", f"pid {fake_snakemake.pid}", "work.lock")
    assert not (bare / "work").exists()


def test_the_lock_is_shared_by_one_engine_and_taken_over_when_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_snakemake: subprocess.Popen) -> None:
    monkeypatch.chdir(tmp_path)
    hold_lock(tmp_path, fake_snakemake)
    monkeypatch.setattr(cli, "current_engine", lambda: ("snakemake", os.getpid()))
    cli.claim_workdir("corpus")  # the same engine: shares it
    monkeypatch.setattr(cli, "current_engine", lambda: ("dvc", os.getpid()))
    with pytest.raises(cli.EngineLockError, match="being built by a snakemake run"):
        cli.claim_workdir("corpus")
    fake_snakemake.kill()
    fake_snakemake.wait()
    cli.claim_workdir("corpus")  # its holder is gone: taken over
    assert json.loads((tmp_path / "work.lock").read_text())["engine"] == "dvc"


# -------------------------------------------------------------------------------- 8 counting CLI
HF = {"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
      "intermediate_size": 128, "vocab_size": 100, "num_local_experts": 4, "num_experts_per_tok": 2}
DELETE = object()


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 8}, "top_k (num_experts_per_tok)=8 exceeds experts"),
    ({"num_hidden_layers": -2}, "n_layers (num_hidden_layers)=-2: must be positive"),
    ({"num_attention_heads": 0}, "n_heads (num_attention_heads)=0: must be positive"),
    ({"hidden_size": 10 ** 30}, "hidden_size=1000000000000000000000000000000: larger than any model"),
    ({"hidden_size": float("inf")}, "hidden_size=inf: must be a finite number"),
    ({"num_hidden_layers": DELETE}, "missing key 'num_hidden_layers'"),
])
def test_count_refuses_impossible_configs(change: dict, message: str) -> None:
    cfg = {k: v for k, v in {**HF, **change}.items() if v is not DELETE}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_count_config(cfg)


def test_count_cli_json_list_is_one_error(bare: Path) -> None:
    (bare / "c.json").write_text("[1, 2]")
    assert_clean_error(stage(bare, "plan", "count", "c.json"), "c.json", "must be a JSON object")


# ------------------------------------------------------------------------------------ 9 disk full
FULL_DISK = """
import errno, runpy, sys
import pyarrow.parquet as pq
def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
pq.write_table = full
sys.argv = ["stages.corpus"]
runpy.run_module("stages.corpus", run_name="__main__")
"""


def test_a_full_disk_names_the_output_and_keeps_the_previous_one(project: Path) -> None:
    before = sha256_tree(project / "work/corpus")
    p = copy.deepcopy(TINY)
    p["corpus"]["min_chars"] = 20  # a changed corpus, so the stage really writes
    write_params(project, p)
    r = run([sys.executable, "-c", FULL_DISK], project, check=False)
    assert_clean_error(r, "work/corpus: no space left on device", "MB free")
    assert sha256_tree(project / "work/corpus") == before
    no_temp_leftovers(project / "work")


# ------------------------------------------------------------------------- 10 missing optional deps
def test_auto_on_cuda_without_deepspeed_falls_back_to_torch_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    name, why = engine.engine_choice(TrainConfig(), torch.device("cuda"))
    assert name == "torch" and "DeepSpeed is not installed" in why and "pip install" in why
    assert engine.engine_choice(TrainConfig(), torch.device("cpu")) == ("torch", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.setenv(key, os.environ.get(key, "0" if key != "DS_ACCELERATOR" else "cpu"))
    with pytest.raises(engine.EngineError, match="train.engine=deepspeed: DeepSpeed is not installed"):
        engine.DeepSpeedEngine(None, TrainConfig(engine="deepspeed"), 1e-3, torch.device("cpu"))
