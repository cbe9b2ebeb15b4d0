"""Epoch replay: the unique set, per-epoch permutations, the shared store and the resumable loader."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY

from moe_study.data import replay, shards
from moe_study.data.artefacts import ShardWriter, token_schema
from moe_study.data.shards import Position, ReplayError, ReplayLoader
from moe_study.io import ROOT, read_json, write_json
from stages import replay as replay_stage

EOS = 0
VOCAB = 4096
N_DOCS = 300


def doc_tokens(d: int) -> np.ndarray:
    """Doc d's tokens encode its id (token // 8 == d), so any token can be traced to its doc."""
    n = (d * 37) % 61  # 0..60 tokens; some docs are empty
    return (d * 8 + np.arange(n) % 8 + 8).astype(np.uint16)  # never EOS (0)


def write_tokens(directory: Path, shard_docs: list[list[int]]) -> None:
    w = ShardWriter(directory, "tokens", token_schema("uint16"))
    for docs in shard_docs:
        toks = [doc_tokens(d) for d in docs]
        w.write(pa.table({
            "doc": pa.array(docs, pa.int64()),
            "id": [f"d{d}" for d in docs],
            "source": ["syn"] * len(docs),
            "n_bytes": pa.array([4 * len(t) for t in toks], pa.int64()),
            "tokens": pa.array([t.tolist() for t in toks], pa.list_(pa.uint16())),
        }))
    w.finish(eos_id=EOS, dtype="uint16", vocab_size=VOCAB, docs=sum(map(len, shard_docs)))


def heldout(d: int) -> bool:
    return d % 10 == 3


def write_split(directory: Path, n_docs: int = N_DOCS, drop: tuple[int, ...] = (5, 6)) -> None:
    """Every doc but `drop` (deduplicated away) is in the split; one in ten is held out."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [d for d in range(n_docs) if d not in drop]
    pq.write_table(pa.table({"doc": pa.array(docs, pa.int64()),
                             "split": ["heldout" if heldout(d) else "train" for d in docs]}),
                   directory / "split.parquet")
    train_tokens = sum(len(doc_tokens(d)) for d in docs if not heldout(d))
    write_json(directory / "manifest.json", {"train_tokens": train_tokens})


def write_plan(work: Path, run: str, tokens: int, unique: int, seq_len: int = 16, batch: int = 4,
               seed: int = 11) -> Path:
    path = work / "runs" / run / "plan.json"
    write_json(path, {"run": run, "tokens": tokens, "unique_tokens": unique, "arch": {"seq_len": seq_len},
                      "batch_size": batch, "steps": tokens // (batch * seq_len), "data_seed": seed})
    return path


def train_tokens_available() -> int:
    return sum(len(doc_tokens(d)) for d in range(N_DOCS) if d not in (5, 6) and not heldout(d))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    write_tokens(w / "tokens", [list(range(0, 120)), list(range(120, 200)), list(range(200, N_DOCS))])
    write_split(w / "split")
    return w


def run_replay(work: Path, run: str, **plan) -> tuple[dict, Path]:
    plan_path = write_plan(work, run, **plan)
    m = replay.build_replay(run, plan_path, work / "tokens", work / "split", work / "store" / "replay")
    out = work / "runs" / run / "replay.json"
    write_json(out, m)
    return m, out


def epoch_files(work: Path) -> list[Path]:
    return sorted((work / "store" / "replay").rglob("epoch-*.bin"))


U = 4000  # of ~7.5k train tokens available


# ------------------------------------------------------------------------------------ unique set
def test_unique_set_is_exactly_u_train_tokens_with_eos_separators(work: Path) -> None:
    """U counts the EOS separators (issue 14): one epoch's stream is exactly U tokens, so the planner knows
    how long a pass is and `epochs` is the number of passes actually served."""
    m, _ = run_replay(work, "a", tokens=16 * 4 * 40, unique=U)
    assert m["unique"]["tokens"] + m["unique"]["docs"] == U and m["unique"]["requested"] == U
    u = shards.ensure_unique_set(work / "store" / "replay", shards.UniqueSpec(**m["unique"]["spec"]))
    docs = u.index[:, 0]
    assert not any(heldout(int(d)) or d in (5, 6) for d in docs), "only train docs"
    assert all(len(doc_tokens(int(d))) > 0 for d in docs), "empty docs skipped"
    trunc = m["unique"]["last_doc"]
    for d, start, n in u.index:
        full = doc_tokens(int(d))
        want = full[: trunc["kept"]] if d == trunc["doc"] else full
        assert np.array_equal(u.tokens[start:start + n], want)

    stream = np.fromfile(m["epochs"][0]["path"], dtype="<u2")
    assert len(stream) == U == u.n_tokens + u.n_docs == m["stream_tokens_per_epoch"]
    assert m["epochs_fraction"] == pytest.approx(m["sequences"] / m["sequences_per_epoch"])
    assert stream[0] == EOS and int((stream == EOS).sum()) == u.n_docs
    pieces = np.split(stream, np.flatnonzero(stream == EOS))[1:]  # each starts with its EOS
    got = sorted(int(p[1] // 8 - 1) for p in pieces)
    assert got == sorted(int(d) for d in docs), "every unique doc once per epoch, each after an EOS"
    for p in pieces:
        assert len(set((p[1:] // 8).tolist())) == 1, "a doc's tokens stay contiguous"


def test_unique_too_large_is_a_clear_error(work: Path) -> None:
    avail = train_tokens_available()
    with pytest.raises(ReplayError, match=rf"budget.unique_tokens={avail + 1} exceeds the {avail} tokens"):
        run_replay(work, "a", tokens=1024, unique=avail + 1)
    m, _ = run_replay(work, "b", tokens=1024, unique=avail)  # all of it is fine (U counts the EOS: fewer docs)
    assert m["unique"]["tokens"] + m["unique"]["docs"] == avail


def test_smaller_u_is_a_subset_and_layout_does_not_matter(work: Path, tmp_path: Path) -> None:
    m_small, _ = run_replay(work, "s", tokens=1024, unique=1000)
    m_big, _ = run_replay(work, "b", tokens=1024, unique=U)
    root = work / "store" / "replay"
    small = shards.ensure_unique_set(root, shards.UniqueSpec(**m_small["unique"]["spec"]))
    big = shards.ensure_unique_set(root, shards.UniqueSpec(**m_big["unique"]["spec"]))
    assert set(small.index[:, 0].tolist()) <= set(big.index[:, 0].tolist())

    # the same docs in other shards (and another shard order): other artefact hash, same epoch bytes
    w2 = tmp_path / "w2"
    write_tokens(w2 / "tokens", [list(range(150, N_DOCS)), list(range(0, 150))])
    shutil.copytree(work / "split", w2 / "split")
    t = pq.read_table(w2 / "split" / "split.parquet")
    pq.write_table(t.take(np.arange(len(t))[::-1]), w2 / "split" / "split.parquet")  # other row order
    m2, _ = run_replay(w2, "b", tokens=1024, unique=U)
    assert m2["unique"]["spec"]["train_sha256"] == m_big["unique"]["spec"]["train_sha256"]
    assert m2["store"]["key"] != m_big["store"]["key"]
    assert Path(m2["epochs"][0]["path"]).read_bytes() == Path(m_big["epochs"][0]["path"]).read_bytes()


# --------------------------------------------------------------------------- determinism, seeds
def _splitmix64_ref(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_permutation_is_pinned() -> None:
    """The order must never change with a numpy upgrade: pinned, and equal to a pure-Python reference."""
    assert shards.seeded_permutation(10, 1, 2).tolist() == [1, 3, 5, 7, 2, 8, 6, 0, 9, 4]
    for n, seeds in ((1000, (7,)), (257, (-3, 5, 1 << 40))):
        h = 0
        for w in seeds:
            h = _splitmix64_ref(h ^ (w & ((1 << 64) - 1)))
        keys = [_splitmix64_ref(_splitmix64_ref(i ^ h)) for i in range(n)]
        assert shards.seeded_permutation(n, *seeds).tolist() == sorted(range(n), key=lambda i: keys[i])


def test_identical_inputs_give_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outs = []
    for name in ("x", "y"):
        d = tmp_path / name
        write_tokens(d / "work" / "tokens", [list(range(0, 170)), list(range(170, N_DOCS))])
        write_split(d / "work" / "split")
        write_plan(d / "work", "dense", tokens=16 * 4 * 300, unique=U)
        (d / "params.yaml").write_text(yaml.safe_dump(TINY))  # the CI study: it has a run named "dense"
        monkeypatch.chdir(d)
        assert replay_stage.main(["--run", "dense", "--params", "params.yaml"]) == 0
        outs.append(d)
    a, b = outs
    ra, rb = (p / "work/runs/dense/replay.json" for p in outs)
    assert ra.read_bytes() == rb.read_bytes()
    m = json.loads(ra.read_text())
    assert m["n_epochs"] >= 3
    for e in m["epochs"]:
        assert not Path(e["path"]).is_absolute()
        assert (a / e["path"]).read_bytes() == (b / e["path"]).read_bytes()


def test_seeds_and_epochs_change_the_order(work: Path) -> None:
    m1, _ = run_replay(work, "a", tokens=16 * 4 * 200, unique=U, seed=1)
    m2, _ = run_replay(work, "b", tokens=16 * 4 * 200, unique=U, seed=2)
    assert m1["store"]["key"] != m2["store"]["key"]
    e0, e1 = (np.fromfile(e["path"], dtype="<u2") for e in m1["epochs"][:2])
    assert not np.array_equal(e0, e1), "each epoch is a fresh permutation"
    assert np.array_equal(np.sort(e0), np.sort(e1)), "of the same tokens"
    assert [e["seed"] for e in m1["epochs"]] == [[1, e] for e in range(m1["n_epochs"])]
    assert not np.array_equal(e0, np.fromfile(m2["epochs"][0]["path"], dtype="<u2"))


# ----------------------------------------------------------------------------- sharing and reuse
def test_runs_share_and_reuse_epoch_files(work: Path) -> None:
    per_step = 16 * 4
    m_a, _ = run_replay(work, "dense", tokens=per_step * 120, unique=U)  # ~2 epochs
    files = epoch_files(work)
    assert len(files) == m_a["n_epochs"] == 2
    ident = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}

    m_c, _ = run_replay(work, "dense_seed2", tokens=per_step * 120, unique=U)  # same data plan
    assert epoch_files(work) == files
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == ident, "nothing rewritten"
    assert m_c["epochs"] == m_a["epochs"] and m_c["store"] == m_a["store"]

    m_b, _ = run_replay(work, "moe", tokens=per_step * 290, unique=U)  # ~4.4 epochs: reuses 0 and 1
    assert m_b["store"] == m_a["store"] and m_b["n_epochs"] == 5
    after = epoch_files(work)
    assert len(after) == 5 and set(files) <= set(after)
    for f in files:
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == ident[f.name]
    assert m_b["epochs"][:2] == [{**e, "sequences_used": e["sequences_total"]} for e in m_a["epochs"]]
    assert m_b["epochs"][-1]["sequences_used"] < m_b["epochs"][-1]["sequences_total"]

    # another context length reads the same epoch streams
    m_d, _ = run_replay(work, "long", tokens=32 * 4 * 40, unique=U, seq_len=32)
    assert epoch_files(work) == after and m_d["epochs"][0]["sha256"] == m_a["epochs"][0]["sha256"]
    assert len(list((work / "store" / "replay").iterdir())) == 1
    assert not list((work / "store").rglob(".tmp-*"))


# -------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("tokens", [16 * 4 * 290, 16 * 4 * 290 - 40])
def test_loader_serves_the_budget(work: Path, tokens: int) -> None:
    m, out = run_replay(work, "moe", tokens=tokens, unique=U)
    loader = ReplayLoader(out, batch_size=4)
    rows = [b for b in loader]
    seqs = np.concatenate([r.numpy() for r in rows])
    assert rows[0].dtype.is_floating_point is False and rows[0].shape == (4, 17)
    assert abs(loader.tokens_served - tokens) < 16 and loader.tokens_served == m["tokens_served"]
    assert len(seqs) * 16 == loader.tokens_served
    assert loader.position == Position(m["n_epochs"], 0) and len(loader) == 0
    # sequences are stride-seq_len windows of the epoch streams, in epoch order
    i = 0
    for e in m["epochs"]:
        stream = np.fromfile(e["path"], dtype="<u2").astype(np.int64)
        for k in range(e["sequences_used"]):
            assert np.array_equal(seqs[i], stream[k * 16: k * 16 + 17])
            i += 1
    assert i == len(seqs)


def test_ranks_split_each_global_batch(work: Path) -> None:
    _, out = run_replay(work, "moe", tokens=16 * 6 * 100, unique=U, batch=6)
    full = [b.numpy() for b in ReplayLoader(out, batch_size=6)]
    ranks = [ReplayLoader(out, batch_size=6, rank=r, world_size=4) for r in range(4)]
    for step, batch in enumerate(full):
        parts = [next(r).numpy() for r in ranks]
        assert [len(p) for p in parts] == [2, 2, 1, 1]
        assert np.array_equal(np.concatenate(parts), batch), step
        assert len({r.tokens_served for r in ranks}) == 1 and ranks[0].position == ranks[3].position
    with pytest.raises(ValueError, match="world_size"):
        ReplayLoader(out, batch_size=6, rank=4, world_size=4)


def test_resume_is_exact(work: Path) -> None:
    _, out = run_replay(work, "moe", tokens=16 * 5 * 150, unique=U, batch=5)
    full = [b.numpy() for b in ReplayLoader(out, batch_size=5)]
    per_epoch = read_json(out)["sequences_per_epoch"]
    assert per_epoch % 5, "some batch spans two epochs"
    for cut in (1, per_epoch // 5, per_epoch // 5 + 1, len(full) - 1):
        first = ReplayLoader(out, batch_size=5)
        for _ in range(cut):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = ReplayLoader(out, batch_size=5)
        resumed.load_state_dict(state)
        assert resumed.tokens_served == first.tokens_served == cut * 5 * 16
        rest = [b.numpy() for b in resumed]
        assert len(rest) == len(full) - cut
        assert all(np.array_equal(x, y) for x, y in zip(rest, full[cut:], strict=True))
        again = [b.numpy() for b in ReplayLoader(out, batch_size=5, start=first.position)]
        assert all(np.array_equal(x, y) for x, y in zip(again, full[cut:], strict=True))
    with pytest.raises(ReplayError, match="another replay"):
        ReplayLoader(out, 5).load_state_dict({**state, "seq_len": 32})
    with pytest.raises(ReplayError, match="outside"):
        ReplayLoader(out, 5, start=Position(99, 0))


def test_corrupt_or_missing_store_files_are_rebuilt(work: Path) -> None:
    m, out = run_replay(work, "moe", tokens=16 * 4 * 200, unique=U)
    full = [b.numpy() for b in ReplayLoader(out, batch_size=4)]
    path = Path(m["epochs"][1]["path"])
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ReplayError, match="sha256"):
        list(ReplayLoader(out, batch_size=4, rebuild=False))
    assert all(np.array_equal(x, y) for x, y in zip(ReplayLoader(out, 4), full, strict=True))
    assert shards.sha256_file(path) == m["epochs"][1]["sha256"]

    # the replay stage also detects a corrupt epoch and rebuilds it, with an identical manifest
    path.write_bytes(bytes(raw))
    m2, _ = run_replay(work, "moe", tokens=16 * 4 * 200, unique=U)
    assert m2 == m and shards.sha256_file(path) == m["epochs"][1]["sha256"]

    # cache cleared: the loader rebuilds the unique set and every epoch from the recorded inputs
    shutil.rmtree(work / "store")
    assert all(np.array_equal(x, y) for x, y in zip(ReplayLoader(out, 4), full, strict=True))
    assert len(epoch_files(work)) == m["n_epochs"]

    # changed inputs: rebuilding would give other data, so it is refused
    shutil.rmtree(work / "store")
    write_split(work / "split", drop=(5, 6, 7))
    with pytest.raises(ReplayError, match="differs from the split"):
        next(ReplayLoader(out, 4))


def _build(args: tuple[str, dict]) -> str:
    root, spec = args
    u = shards.ensure_unique_set(root, shards.UniqueSpec(**spec))
    return shards.build_epoch(u, 3)["sha256"]


def test_concurrent_builders_of_one_epoch(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = run_replay(work, "a", tokens=1024, unique=U)
    root = str(work / "store" / "replay")
    with mp.get_context("fork").Pool(3) as pool:
        hashes = pool.map(_build, [(root, m["unique"]["spec"])] * 6)
    assert len(set(hashes)) == 1
    u = shards.ensure_unique_set(root, shards.UniqueSpec(**m["unique"]["spec"]))
    assert shards.epoch_valid(u, 3) is not None
    assert not list(Path(root).rglob(".tmp-*"))


def test_bad_plan_is_a_clear_error(work: Path) -> None:
    p = write_plan(work, "a", tokens=1024, unique=U)
    plan = read_json(p)
    del plan["data_seed"]
    write_json(p, plan)
    with pytest.raises(ReplayError, match="missing key 'data_seed'"):
        replay.build_replay("a", p, work / "tokens", work / "split", work / "store" / "replay")
    with pytest.raises(ReplayError, match="below model.seq_len"):
        run_replay(work, "b", tokens=1024, unique=10, seq_len=32)


KILL_CHILD = """
import sys, time
from moe_study.data import shards
shards.CHUNK_TOKENS = 64
slow = shards.progress
def crawl(it, **kw):
    for x in slow(it, **kw):
        time.sleep(0.02)
        yield x
shards.progress = crawl
import json
u = shards.ensure_unique_set(sys.argv[1], shards.UniqueSpec(**json.loads(sys.argv[2])))
shards.build_epoch(u, 7)
"""


def test_kill_9_mid_build_leaves_no_epoch_file(work: Path) -> None:
    m, _ = run_replay(work, "a", tokens=1024, unique=U)
    root = work / "store" / "replay"
    env = {**os.environ, "NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(root), json.dumps(m["unique"]["spec"])],
                             env=env)
    deadline = time.time() + 30
    while not list(root.rglob(".tmp-epoch-00007.bin-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, "the build finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    u = shards.ensure_unique_set(root, shards.UniqueSpec(**m["unique"]["spec"]))
    assert not shards.epoch_paths(u.dir, 7)[0].exists() and shards.epoch_valid(u, 7) is None
    assert len(list(root.rglob(".tmp-epoch-00007.bin-*"))) == 1, "only the dead writer's temp file"
    info, built = shards.ensure_epoch(u, 7)
    assert built and shards.epoch_valid(u, 7) == info
    assert not list(root.rglob(".tmp-*")), "the dead writer's temp file was swept"
