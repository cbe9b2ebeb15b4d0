"""The training step's hot path: what it reduces across processes and copies to the host, per step.

The loop needs the loss, the aux/z losses, the MoE load and the pre-clip gradient norm on the host every
step (the NaN / spike stop runs before the update; every step is a row of steps.parquet), so the step
packs them into one tensor: one all-reduce, one device-to-host copy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_eval import PARAMS, VOCAB, ListLoader, counting_batches, make_work

from moe_study.accounting import plan_run
from moe_study.config.schema import parse_params
from moe_study.model.lm import build_model
from moe_study.train import launch
from moe_study.train import loop as T
from moe_study.train.engine import make_engine
from stages import train as train_stage


def trainer(run: str, batches: list[torch.Tensor], batch_size: int, device: str = "cpu",
            **train: object) -> T.Trainer:
    p = parse_params(PARAMS)
    cfg = p.train.model_copy(update={"device": device, "engine": "torch", **train})
    torch.manual_seed(0)
    model = build_model(plan_run(p, run).arch.to_dict(), VOCAB)
    engine = make_engine(model, cfg, 1e-2, torch.device(device))
    return T.Trainer(engine=engine, loader=ListLoader(batches, 16), steps=len(batches), batch_size=batch_size,
                     seq_len=16, vocab_size=VOCAB, lr=1e-2, cfg=cfg)


def test_a_step_all_reduces_once_and_copies_to_the_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of two processes, simulated in one: the all-reduce doubles the tensor (the other rank holding
    the same numbers), so the averaged values must be exactly those of one process training on rank 0's
    half of every batch. Counted: the loop's all-reduces and `.cpu()` copies (the engine's gradient
    all-reduce is not the loop's; this engine believes it is alone)."""
    batches = counting_batches(5)
    reduced: list[torch.Tensor] = []

    def all_reduce(t: torch.Tensor, *args: object, **kwargs: object) -> None:
        reduced.append(t.clone())
        t.mul_(2)

    copies = []
    cpu = torch.Tensor.cpu

    def counting_cpu(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        copies.append(tuple(t.shape))
        return cpu(t, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(T, "dist_env", lambda: (0, 2, 0))
    two = trainer("moe", batches, 4, micro_batch_size=1, z_loss_coef=1e-3)
    assert (two.world, two.micro, two.accumulation) == (2, 1, 2)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    two.run()
    monkeypatch.undo()
    layers, experts = two.history[0].load.shape
    assert [t.numel() for t in reduced] == [3 + layers * experts] * 5  # ce, aux, z, load: one all-reduce a step
    assert copies == [(3 + layers * experts + 1,)] * 5  # ... and the grad norm: one device-to-host copy a step

    one = trainer("moe", [b[:2] for b in batches], 2, micro_batch_size=1, z_loss_coef=1e-3)
    one.run()
    for a, b in zip(two.history, one.history, strict=True):
        assert (a.loss, a.aux_loss, a.z_loss, a.grad_norm) == (b.loss, b.aux_loss, b.z_loss, b.grad_norm)
        np.testing.assert_array_equal(a.load, b.load)
    assert torch.equal(two.load_sum, one.load_sum)


def test_the_torch_engine_clips_with_the_norm_tensor_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """grad_norm() stays a device tensor (no float round trip to the host and back); step() clips with
    that very tensor."""
    t = trainer("dense", counting_batches(1), 4, grad_clip=1e-3)
    batch = counting_batches(1)[0]
    out = t.engine.forward(batch[:, :-1], batch[:, 1:])
    t.engine.backward(out.ce, 1)
    grads = [p.grad.clone() for p in t.engine.module.parameters()]
    norm = t.engine.grad_norm()
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))))
    seen = []
    clip = torch.nn.utils.clip_grads_with_norm_

    def spy(params: object, max_norm: float, total_norm: torch.Tensor, *args: object) -> None:
        seen.append(total_norm)
        clip(params, max_norm, total_norm, *args)

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", spy)
    t.engine.step(1e-2, norm)
    assert len(seen) == 1 and seen[0] is norm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the host syncs that matter are GPU ones)")
def test_one_host_sync_per_step_on_the_gpu() -> None:
    """torch's sync debug mode flags every call that makes the host wait for the GPU: a dense step with the
    torch engine has exactly one (the packed losses + grad norm). Written without a GPU at hand: if this
    fails, the warnings it prints name the extra sync."""
    t = trainer("dense", counting_batches(4), 4, device="cuda")
    t.steps = 1
    t.run()  # first step: allocations, library initialisation
    t.steps = 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 3, syncs


def test_load_statistics_are_computed_once_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-layer load stats are computed in the step and reused by steps.parquet and dvclive (once per
    step, plus once for the run's summary in train.json); the step's summary is exactly the max / mean over
    the layer columns, and those follow exactly from the fractions the file stores."""
    import pyarrow.parquet as pq

    from moe_study.train import trainlog

    calls = []
    stats = trainlog.layer_load_stats

    def counting(load: torch.Tensor) -> tuple[list[float], list[float]]:
        calls.append(tuple(load.shape))
        return stats(load)

    monkeypatch.setattr(trainlog, "layer_load_stats", counting)
    p = parse_params(PARAMS)
    work = make_work(tmp_path, p, ["moe"])
    res = T.run_train(p, "moe", work=work)
    assert len(calls) == res["steps"] + 1
    t = pq.read_table(work / "runs/moe/steps.parquet").to_pydict()
    for i in range(res["steps"]):
        ratio, ent = stats(torch.tensor(t["layer_expert_fraction"][i], dtype=torch.float32))
        assert (t["layer_load_max_over_mean"][i], t["layer_load_entropy"][i]) == (ratio, ent)
        assert t["load_max_over_mean"][i] == max(ratio) and t["load_entropy"][i] == sum(ent) / len(ent)
    assert (work / "runs/moe/dvclive/plots/metrics/train/layer0/load_entropy.tsv").exists()


@pytest.mark.parametrize("batch, processes, micro", [(32, 2, 4), (32, 1, None), (16, 4, 2), (12, 3, 1), (8, 2, 8),
                                                     (10, 4, None), (16, 2, 3), (4, 1, 4)])
def test_one_batch_split_for_params_the_loop_and_deepspeed(monkeypatch: pytest.MonkeyPatch, batch: int,
                                                           processes: int, micro: int | None) -> None:
    """schema.batch_split is the only definition of micro-batch and accumulation: params.yaml validation
    (gpus), the Trainer and the generated DeepSpeed config (world size) accept the same splits and agree."""
    from moe_study.config.schema import ParamsError, batch_split
    from moe_study.train.engine import EngineError, deepspeed_config

    raw = {**PARAMS, "train": PARAMS["train"] | {"batch_size": batch, "gpus": processes, "micro_batch_size": micro}}
    try:
        want = batch_split(batch, processes, micro)
    except ValueError:
        want = None
    if want is None:
        with pytest.raises(ParamsError, match="batch_size"):
            parse_params(raw)
    else:
        assert want[0] * want[1] * processes == batch
        parse_params(raw)
    cfg = parse_params(PARAMS).train.model_copy(update={"batch_size": batch, "micro_batch_size": micro})
    if want is None:
        with pytest.raises(EngineError, match="batch_size"):
            deepspeed_config(cfg, 1e-3, "cuda", processes)
    else:
        ds = deepspeed_config(cfg, 1e-3, "cuda", processes)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == want
        assert ds["train_batch_size"] == batch
    monkeypatch.setattr(T, "dist_env", lambda: (0, processes, 0))
    if want is None:
        with pytest.raises(T.TrainError, match="batch_size"):
            T.Trainer(engine=None, loader=None, steps=1, batch_size=batch, seq_len=16, vocab_size=VOCAB, lr=1e-2,
                      cfg=cfg)
    else:
        t = T.Trainer(engine=None, loader=None, steps=1, batch_size=batch, seq_len=16, vocab_size=VOCAB, lr=1e-2,
                      cfg=cfg)
        assert (t.micro, t.accumulation) == want


def relaunch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int, device: str, cuda: int) -> list[list[str]]:
    """relaunch_under_torchrun with `cuda` visible GPUs (0: no CUDA); returns the torchrun commands it ran."""
    import yaml

    raw = {**PARAMS, "train": PARAMS["train"] | {"gpus": gpus, "device": device}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    launched: list[list[str]] = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    assert launch.relaunch_under_torchrun(["--run", "dense", "--params", str(tmp_path / "params.yaml")]) in (0, None)
    return launched


@pytest.mark.parametrize("gpus, device, cuda", [(2, "cpu", 0), (2, "auto", 0), (2, "cpu", 1), (2, "auto", 2),
                                                (4, "cuda", 8), (1, "auto", 0), (1, "cuda", 1)])
def test_train_gpus_that_fit_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int, device: str,
                                    cuda: int) -> None:
    """CPU runs (processes, gloo) are never checked; GPU runs launch when train.gpus GPUs are visible."""
    launched = relaunch(tmp_path, monkeypatch, gpus, device, cuda)
    assert [c for cmd in launched for c in cmd if c.startswith("--nproc_per_node")] == (
        [f"--nproc_per_node={gpus}"] if gpus > 1 else [])


@pytest.mark.parametrize("gpus, device, cuda", [(2, "auto", 1), (4, "cuda", 2), (2, "cuda", 0)])
def test_too_many_train_gpus_is_an_error_before_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, gpus: int, device: str,
                                                         cuda: int) -> None:
    with pytest.raises(launch.LaunchError, match=f"train.gpus={gpus} but {cuda} CUDA device"):
        relaunch(tmp_path, monkeypatch, gpus, device, cuda)
    with pytest.raises(SystemExit) as exit_:  # the command line: one line, exit 2, nothing launched
        train_stage.main(["--run", "dense", "--params", str(tmp_path / "params.yaml")])
    assert exit_.value.code == 2 and f"error: train.gpus={gpus}" in capsys.readouterr().err


def test_a_process_without_a_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launched from outside (torchrun / srun with more processes per node than GPUs): named, not an
    'invalid device ordinal' from CUDA."""
    from moe_study.train.engine import EngineError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(EngineError, match="LOCAL_RANK=2 has no GPU: 2 CUDA"):
        resolve_device("auto")


def test_cuda_graph_is_off_on_cpu_and_the_cpu_step_unchanged() -> None:
    """train.cuda_graph on a CPU: the loop says why it is off and trains exactly as without it."""
    plain = trainer("dense", counting_batches(3), 4)
    plain.run()
    graphed = trainer("dense", counting_batches(3), 4, cuda_graph=True)
    assert T.attach_step_graphs(graphed) == "train.cuda_graph needs CUDA, not cpu"
    assert graphed.engine.graphs is None
    graphed.run()
    assert [s.loss for s in graphed.history] == [s.loss for s in plain.history]
    assert [s.grad_norm for s in graphed.history] == [s.grad_norm for s in plain.history]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
@pytest.mark.parametrize("run", ["dense", "moe"])
def test_cuda_graph_steps_match_eager_steps_on_the_gpu(run: str) -> None:
    """Graphed steps (after 3 eager warm-up steps) follow the eager GPU run within bf16/fp32 rounding, and
    a replay launches two graphs instead of hundreds of kernels."""
    batches = counting_batches(8)
    eager = trainer(run, batches, 4, device="cuda", dtype="bf16")
    eager.run()
    graphed = trainer(run, batches, 4, device="cuda", dtype="bf16", cuda_graph=True)
    assert T.attach_step_graphs(graphed) is None
    graphed.run()
    g = graphed.engine.graphs
    backends = set(graphed.engine.module.expert_backends().values())
    if "reference" in backends:  # the tiny MoE's widths do not suit the grouped kernels: stays eager, says why
        assert not g.captured and "reference" in g.disabled
    else:
        assert g.captured and g.opt is not None and g.disabled is None
    for a, b in zip(eager.history, graphed.history, strict=True):
        assert abs(a.loss - b.loss) <= 2e-2 * abs(a.loss), (a.loss, b.loss)
        assert abs(a.grad_norm - b.grad_norm) <= 5e-2 * abs(a.grad_norm) + 1e-6, (a.grad_norm, b.grad_norm)
