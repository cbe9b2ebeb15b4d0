"""The one schema of `params.yaml`.

Every stage, the Snakefile, the DVC generator and the tests validate the same file through
`load_params`, so a bad value fails before any compute, with one message naming the field.
Unknown keys are errors everywhere (`extra="forbid"`): a typo must never silently fall back to a
default.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# \A...\Z, not ^...$: `$` also matches before a trailing newline, and a run name reaches DVC's and
# Snakemake's shell command lines (`--run ${key}`) and paths, so it must be exactly these characters.
RUN_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
STUDY_NAME = r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z"


class Strict(BaseModel):
    """Every section: unknown keys, coerced types and non-finite numbers are errors.

    strict: `seed: true` must not become 1, nor `"3"` become 3 (a quoted value is a typo or an edit
    gone wrong); ints still fill float fields. allow_inf_nan=False: `.inf` / `.nan` in a budget or a
    rate would reach the planner's arithmetic as a traceback or an absurd plan. python-re: every
    pattern is anchored with \\A...\\Z, which means the same in Python's `re` (the run-name check).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              regex_engine="python-re")


# ----------------------------------------------------------------------------------------- corpus
class DebianSource(Strict):
    """Public-domain text shipped as a Debian package (`apt-get download` + `dpkg -x`, no root)."""

    kind: Literal["debian"]
    package: str = Field(pattern=r"\A[a-z0-9][a-z0-9.+-]+\Z")
    max_docs: int | None = Field(default=None, gt=0)


class FileSource(Strict):
    """The user's own documents: Parquet or JSONL with a text column, or plain-text files."""

    kind: Literal["parquet", "jsonl", "text"]
    path: str = Field(min_length=1, description="file, directory or glob, relative to the repo root")
    text_field: str = "text"
    id_field: str | None = None
    max_docs: int | None = Field(default=None, gt=0)
    # plain text only: one document per file, or per blank-line separated paragraph
    split: Literal["file", "paragraph"] = "file"


class SyntheticSource(Strict):
    """Deterministic English-like documents with planted exact and near duplicates (for tests)."""

    kind: Literal["synthetic"]
    docs: int = Field(default=2000, gt=0)
    exact_dup_rate: float = Field(default=0.05, ge=0, lt=1)
    near_dup_rate: float = Field(default=0.05, ge=0, lt=1)
    seed: int = 0


class PythonPackageSource(Strict):
    """The text files of an installed Python distribution (its source, stubs and docs), pinned by version.

    Read through importlib.metadata from the Python that runs the corpus stage: the files its RECORD
    lists that match `include` and none of `exclude` (fnmatch on the path inside site-packages, `*`
    crossing `/`), in path order, each verified against RECORD's sha256. Rebuild it anywhere with
    `pip install <package>==<version>` (the same wheel gives the same files: moe_study/data/pypackage.py).
    """

    kind: Literal["python_package"]
    package: str = Field(pattern=r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z", description="distribution name (pip's)")
    version: str = Field(min_length=1, description="the installed version must equal this (else an error)")
    include: list[str] = Field(default=["*.py", "*.pyi", "*.md", "*.rst", "*.txt"], min_length=1,
                               description="fnmatch globs over RECORD paths; a file is read if one matches")
    exclude: list[str] = Field(
        default=["*.dist-info/*", "*/tests/*", "*/test/*", "*/_vendor/*", "*/vendor/*", "*/_vendored/*",
                 "*/third_party/*"],
        description="fnmatch globs; a matching file is skipped (counted as `excluded`). The default leaves out "
        "the metadata, test suites (generated expected outputs, numeric fixtures, parametrised near-copies) and "
        "vendored copies of other packages (the same file in several packages); [] reads everything")
    max_docs: int | None = Field(default=None, gt=0)


Source = Annotated[DebianSource | FileSource | SyntheticSource | PythonPackageSource, Field(discriminator="kind")]


class CorpusConfig(Strict):
    sources: list[Source] = Field(min_length=1)
    min_chars: int = Field(default=16, ge=1, description="documents shorter than this are counted and skipped")


# -------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(Strict):
    vocab_size: int = Field(default=4096, ge=260, le=1 << 20)
    special_tokens: list[str] = Field(default=["<|endoftext|>"], min_length=1)
    path: str | None = Field(default=None, description="use this tokenizer.json instead of training one")
    train_max_bytes: int = Field(default=200_000_000, gt=0, description="BPE training sample size")
    docs_per_shard: int = Field(default=50_000, gt=0)
    batch_docs: int = Field(default=2_000, gt=0)
    workers: int = Field(default=0, ge=0, description="0 = all cores")

    @property
    def eos(self) -> str:
        return self.special_tokens[0]


# ----------------------------------------------------------------------------------------- dedupe
class DedupeConfig(Strict):
    exact: bool = True
    near: bool = True
    ngram: int = Field(default=5, ge=1, le=32, description="token n-gram size of the shingles")
    num_perm: int = Field(default=128, ge=8, le=1024)
    # LSH banding: a pair of Jaccard s is a candidate with probability 1 - (1 - s^rows)^bands. 25 x 5
    # puts the S-curve's midpoint, (1/bands)^(1/rows) ~ 0.53, well below the 0.7 threshold (P(0.7) ~ 0.99;
    # 16 x 8 gave 0.61); the estimated Jaccard over all num_perm slots then keeps the precision.
    # The dedupe metrics report the recall by Jaccard bucket on planted pairs (`planted_recall`).
    bands: int = Field(default=25, ge=1)
    rows: int = Field(default=5, ge=1)
    threshold: float = Field(default=0.7, gt=0, le=1, description="estimated Jaccard to accept a candidate")
    seed: int = 42
    ignore_whitespace_tokens: bool = Field(
        default=True,
        description="pipeline: drop whitespace-only tokens before hashing, so re-wrapped or re-indented "
        "copies still match (needs the tokenizer.json beside the token shards)",
    )

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupeConfig:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


class SplitConfig(Strict):
    """Train / validation / held-out by duplicate cluster (moe_study/data/split.py). The held-out split is
    the reported test set; the validation split only picks each group's learning rate (aggregate)."""

    heldout_fraction: float = Field(default=0.02, gt=0, lt=0.5)
    validation_fraction: float = Field(
        default=0.02, ge=0, lt=0.5, description="clusters for the validation split (lr selection), taken from "
        "train; the held-out clusters do not move when it changes. 0 = none (then no lr grid can be picked)")
    seed: int = 7

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.heldout_fraction + self.validation_fraction >= 0.9:
            raise ValueError(f"heldout_fraction + validation_fraction = "
                             f"{self.heldout_fraction + self.validation_fraction:g} leaves too little to train on")
        return self


# ----------------------------------------------------------------------------------------- budget
class PlannerConfig(Strict):
    """How the planner equalises runs: conventions, tolerances and the bounds of its search (the
    `budget:` section holds these keys too, so every stage that reads the budget sees them)."""

    compute_convention: Literal["6n", "nonvocab", "exact"] = Field(
        default="exact", description="training FLOPs per token F_i (T_i = C / F_i): 6n = 6 N_active (Kaplan); "
        "nonvocab = 3 M, M the forward FLOPs with attention's sequence term, no LM head (the paper's; the LM "
        "head is then free, which at small d_model / large V favours runs that read more tokens: the planner "
        "warns above 5%); exact = 3 (M + 2 d V), every matmul (tokenizer.vocab_size as V), the default")
    count_embeddings: Literal["nonvocab", "with_embeddings"] = Field(
        default="nonvocab", description="whether budget.params and activation rates count the token embedding "
        "and LM head (the study's N, like the paper's, does not)")
    params_tol: float = Field(default=0.01, gt=0, lt=1, description="allowed |N_i / N - 1| of every run")
    rate_tol: float = Field(default=0.02, gt=0, lt=1, description="allowed |r_a,i / r_a - 1| of every MoE run")
    max_experts: int = Field(default=256, ge=2, description="largest expert count the search tries")
    max_top_k: int = Field(default=16, ge=1, description="largest top_k the search tries (when top_k varies)")
    design: Literal["fewest_active", "paper"] = Field(
        default="fewest_active", description="how MoE runs reach their activation rate (runs.<name>.design "
        "overrides): fewest_active = any expert count / top_k / width within the tolerances, preferring the "
        "fewest routed experts per token (r_a then moves with expert width and top_k); paper = arXiv "
        "2506.12119's 1dense+SE: a fixed routed expert width across the sweep (runs.<name>.expert_width, or "
        "dense FFN width / granularity, or d_model / 4), one shared expert of width top_k x that width, the "
        "first model.first_dense_layers layers dense, r_a reached by choosing experts E and top_k K")


class SizeConfig(Strict):
    """One model size of a multi-size study (budget.sizes.<name>): its own N and C and the model dims that
    differ from the `model` section (d_model, n_layers, n_heads, ...; seq_len stays the study's, so every
    size scores the same windows and tasks). U is the study's: every size trains on the same unique data."""

    params: float = Field(gt=0, description="target non-vocab params N of this size")
    compute: float = Field(gt=0, description="training FLOPs C of this size's runs (x runs.<name>.compute_scale)")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the model section for this size")

    @field_validator("model")
    @classmethod
    def _no_seq_len(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "seq_len" in v:
            raise ValueError("seq_len is the study's (model.seq_len), not a size's")
        return v


class BudgetConfig(PlannerConfig):
    """The equal-resource contract of 2506.12119: every run gets the same three numbers (params, compute,
    unique_tokens), equalised under the conventions and tolerances of PlannerConfig (same section).

    A study of several model sizes names them in `sizes` (each its own params, compute and model dims);
    a run with `size: <name>` is planned at that size, a run without one at `params` / `compute` / `model`.
    """

    params: float = Field(gt=0, description="target total parameters N (non-vocabulary unless "
                          "budget.count_embeddings=with_embeddings)")
    compute: float = Field(gt=0, description="training FLOPs C of every run; a run reads C / its FLOPs per token "
                           "(budget.compute_convention)")
    unique_tokens: int = Field(gt=0, description="unique training tokens U shared by every run")
    sizes: dict[str, SizeConfig] = Field(
        default_factory=dict, description="named model sizes (runs.<name>.size): params, compute and model "
        "overrides per size; empty = one size (params, compute, the model section)")


# ------------------------------------------------------------------------------------------ model
class ModelConfig(Strict):
    """The architecture family shared by all runs; the planner derives FFN widths from the budget."""

    d_model: int = Field(default=64, gt=0)
    n_layers: int = Field(default=2, gt=0)
    n_heads: int = Field(default=4, gt=0)
    seq_len: int = Field(default=128, ge=8)
    multiple_of: int = Field(default=8, ge=1, description="FFN widths are rounded to this multiple")
    tie_embeddings: bool = True
    ffn_hidden: int | None = Field(default=None, gt=0, description="dense reference FFN width (also the dense "
                                   "layers of MoE runs); null = solved from budget.params")
    n_kv_heads: int | None = Field(default=None, gt=0, description="key/value heads (GQA); null = n_heads")
    qkv_bias: bool = Field(default=False, description="biases on the q, k, v projections")
    qk_norm: Literal["none", "layer", "head"] = Field(
        default="none", description="RMSNorm of queries and keys: over all their features (OLMoE) or per head")
    first_dense_layers: int = Field(default=0, ge=0, description="MoE runs: the first k layers stay dense")
    moe_every: int = Field(default=1, ge=1, description="MoE runs: layer i is MoE iff (i + 1) % moe_every == 0")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model / n_heads = {self.d_model // self.n_heads} must be even (rotary pairs)")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.first_dense_layers >= self.n_layers:
            raise ValueError(f"first_dense_layers={self.first_dense_layers} leaves no MoE layer of {self.n_layers}")
        return self


# ------------------------------------------------------------------------------------------- runs
class RunConfig(Strict):
    """One training run. Dense runs take the whole FFN budget; MoE runs hit an activation rate.

    An MoE run gives `activation_rate` (and `top_k`, optionally `experts`), and the planner solves
    the expert width so that total non-vocab params match the budget. Per-run `lr`/`seed` override
    the `train` section so that seeds and learning-rate sweeps are just more runs.
    """

    kind: Literal["dense", "moe"]
    activation_rate: float | None = Field(default=None, gt=0, le=1)
    top_k: int = Field(default=2, ge=1)
    experts: int | None = Field(default=None, ge=2)
    granularity: float | None = Field(default=None, gt=0, description="fine-grained MoE: prefer the shape "
                                      "whose expert width is nearest dense FFN width / granularity (the exact "
                                      "width if expert_width is not in vary)")
    shared_experts: int = Field(default=0, ge=0, description="always-active experts (DeepSeekMoE)")
    shared_expert_width: int | None = Field(default=None, gt=0, description="width of one shared expert; "
                                            "null = the routed expert width")
    shared_gate: bool = Field(default=False, description="sigmoid gate on the shared experts (Qwen2-MoE)")
    design: Literal["fewest_active", "paper"] | None = Field(
        default=None, description="MoE design space (budget.design when null)")
    expert_width: int | None = Field(default=None, gt=0, description="design paper: the routed expert width "
                                     "(null: dense FFN width / granularity, or d_model / 4)")
    vary: list[Literal["experts", "top_k", "expert_width"]] | None = Field(
        default=None, description="dims the planner may choose; null = expert_width and experts (expert_width "
        "and top_k when experts is given)")
    lr: float | None = Field(default=None, gt=0)
    lr_grid: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None, min_length=1, description="learning rates to try: the run expands into one run per value, "
        "named <name>_lr<value> (e.g. dense_s0_lr3e-3), grouped under its group (default: <name>); the aggregate "
        "picks each group's best lr on the validation split")
    seed: int | None = None
    group: str | None = Field(default=None, description="runs of one group are seeds of one point (and, with a "
                              "learning-rate grid, the lrs tried for it)")
    size: str | None = Field(default=None, description="a name in budget.sizes: plan this run at that size's "
                             "params, compute and model dims (null: budget.params / compute, the model section)")
    compute_scale: float = Field(default=1.0, gt=0, le=1000, description="this run's compute is compute_scale x "
                                 "the budget's C (e.g. 2: a dense run at 2C, the data-reuse reference); its "
                                 "compute_budget differs, so it is its own baseline, never pooled with runs at C")

    @model_validator(mode="after")
    def _moe_needs_rate(self) -> RunConfig:
        if self.lr_grid is not None:
            if self.lr is not None:
                raise ValueError("give lr or lr_grid, not both")
            if len(set(self.lr_grid)) != len(self.lr_grid):
                raise ValueError(f"lr_grid {self.lr_grid} repeats a value")
        if self.kind == "moe" and self.activation_rate is None and self.experts is None:
            raise ValueError("an moe run needs activation_rate (or experts)")
        if self.kind == "dense" and (self.activation_rate not in (None, 1.0) or self.experts is not None
                                     or self.shared_experts or self.granularity is not None or self.vary
                                     or self.expert_width is not None):
            raise ValueError("a dense run has activation_rate 1 and no experts, granularity, shared experts or vary")
        if self.experts is not None and self.top_k >= self.experts:
            raise ValueError(f"top_k={self.top_k} must be below experts={self.experts}")
        vary = set(self.vary_dims())
        if "experts" not in vary and self.experts is None and self.kind == "moe":
            raise ValueError("give experts or add experts to vary")
        return self

    def vary_dims(self) -> list[str]:
        """The dims the planner searches (the explicit `vary`, or the default described there)."""
        if self.vary is not None:
            return list(self.vary)
        return ["expert_width", "top_k"] if self.experts is not None else ["expert_width", "experts"]


# ----------------------------------------------------------------------------------------- router
class RouterConfig(Strict):
    """How MoE layers pick experts (moe_study/model/ `Router`); the default is the paper's softmax top-k.

    `score`: softmax over the E logits (Switch/Mixtral) or an independent sigmoid per expert
    (DeepSeek-V3). `normalize_topk`: renormalise the k chosen weights to sum to 1 (Mixtral, OLMoE) or
    keep them as the raw scores (the paper's and Switch's gate, the default). With renormalisation and
    top_k = 1 the gate weight is exactly 1, so the router learns only from the balancing loss, never
    from the language loss; without it every router gets the LM loss's gradient. `bias_balancing`
    turns on DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias, not trained by
    gradients, is added to the scores for the top-k *selection only* (the gate weights stay the
    unbiased scores) and, after every optimizer step, moves by `bias_update_rate` * sign(mean load -
    expert load) (`LM.update_router_bias()`, which the trainer calls). The load-balancing aux loss
    stays available through train.aux_loss_coef (set it to 0, or small, with bias balancing).
    """

    score: Literal["softmax", "sigmoid"] = Field(default="softmax", description="expert scoring function")
    normalize_topk: bool = Field(default=False, description="renormalise the top-k weights to sum to 1 (off: "
                                 "the raw scores, the paper's gate; on: Mixtral/OLMoE, and the study before "
                                 "issue 14; with top_k=1 it leaves the router no LM-loss gradient)")
    bias_balancing: bool = Field(default=False, description="aux-loss-free per-expert selection bias")
    bias_update_rate: float = Field(default=1e-3, ge=0, le=1,
                                    description="bias step per optimizer step (DeepSeek-V3 uses 1e-3)")


# ------------------------------------------------------------------------------------ train, eval
def batch_split(batch_size: int, processes: int, micro_batch_size: int | None = None) -> tuple[int, int]:
    """(micro, accumulation): sequences per forward/backward per process, and micro-steps per optimizer step.

    The one definition of how a global batch splits into `processes` data-parallel shares of
    micro-batches: params.yaml validation (processes = train.gpus), the training loop and the
    generated DeepSpeed config (processes = the launched world size) all call it, so they cannot
    disagree. micro_batch_size None: the whole share in one micro-batch (no accumulation).
    Raises ValueError naming the fields that do not divide.
    """
    share, rest = divmod(batch_size, processes)
    if rest:
        raise ValueError(f"batch_size={batch_size} is not divisible by gpus={processes} (data-parallel processes)")
    micro = micro_batch_size or share
    if share % micro:
        raise ValueError(f"micro_batch_size={micro} does not divide the per-GPU batch batch_size/gpus={share}")
    return micro, share // micro


class TrainConfig(Strict):
    """How every run trains (stages/train.py; the engines and DeepSpeed config: moe_study/train/engine.py).

    `batch_size` is the global batch (sequences per optimizer step, all GPUs together); it is split
    into `gpus` data-parallel shares of `micro_batch_size` sequences, accumulated over
    batch_size / (gpus * micro_batch_size) micro-steps. Checkpoints live outside the stage's outputs
    (work/ckpt/<run>/<key>/, key = hash of plan, data, params and code), so a killed run resumes and a
    changed configuration never resumes a stale checkpoint.
    """

    engine: Literal["auto", "torch", "deepspeed"] = Field(
        default="auto", description="auto: the torch engine on one CUDA process (the fastest measured: "
        "moe_study/train/speed.py), deepspeed on several, the plain-torch twin on CPU (named in train.json)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"
    expert_backend: Literal["auto", "reference", "torch_grouped", "cutlass", "fused"] = Field(
        default="auto", description="MoE expert GEMMs (kernels/experts.py); auto: torch_grouped on CUDA (the "
        "fastest measured once the step is graphed, moe_study/train/speed.py), reference on CPU")
    batch_size: int = Field(default=16, gt=0, description="global batch: sequences per optimizer step")
    micro_batch_size: int | None = Field(
        default=None, gt=0, description="sequences per forward/backward per GPU (None: batch_size / gpus, "
        "no accumulation); gradient accumulation = batch_size / (gpus * micro_batch_size)")
    gpus: int = Field(default=1, ge=1, description="data-parallel processes (GPUs); >1 re-launches under torchrun")
    zero_stage: Literal[1, 2] = Field(default=1, description="DeepSpeed ZeRO stage (optimizer / +gradient sharding)")
    compile: bool | Literal["auto"] = Field(
        default="auto", description="torch.compile each block and the loss head (final norm, LM head, cross-entropy) "
        "in place: state_dict keys unchanged; auto: on for one CUDA process on the torch engine (measured faster, "
        "moe_study/train/speed.py), off otherwise and on CPU")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = Field(
        default=None, description="torch.compile mode when compile is on (None: torch's default; with compile: "
        "auto, the mode used where auto turns it on)")
    cuda_graph: bool | Literal["auto"] = Field(
        default="auto", description="torch engine on CUDA: each training step as two CUDA graphs (forward+backward+"
        "norm, clip+AdamW; moe_study/train/cudagraph.py); ignored on CPU; auto: on where it can run (one CUDA "
        "process, torch engine, no gradient accumulation: moe_study/train/speed.py), else off with the reason")
    lr: float = Field(default=3e-3, gt=0)
    lr_grid: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None, min_length=1, description="study-level learning-rate grid: every run that sets neither lr "
        "nor lr_grid expands over it (see runs.<name>.lr_grid)")
    vary_data_order: bool = Field(
        default=True, description="a run of seed > 0 also reads its epochs in a seed-dependent order (the unique "
        "set U stays the same); seed 0 keeps the study's order (params `seed`)")
    schedule: Literal["cosine", "wsd"] = Field(
        default="cosine", description="after warmup: cosine to min_lr_ratio*lr, or warmup-stable-decay (constant, "
        "then linear to min_lr_ratio*lr over the last decay_fraction of the steps)")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=20, ge=0, description="linear warmup steps (unless warmup_fraction is set)")
    warmup_fraction: float | None = Field(default=None, ge=0, lt=1, description="warmup as a fraction of the steps")
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="wsd: fraction of the steps that decay")
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    max_grad_norm: float = Field(
        default=1e4, gt=0, description="a pre-clip gradient norm above this (or NaN/Inf) stops the run with an "
        "error, keeping the last good checkpoint")
    aux_loss_coef: float = Field(default=0.01, ge=0, description="load-balancing loss weight (MoE)")
    z_loss_coef: float = Field(default=0.0, ge=0, description="router z-loss weight (MoE; 0 = off)")
    seed: int = 0
    threads: int = Field(default=0, ge=0, description="torch CPU threads, 0 = all cores")
    log_every: int = Field(default=25, gt=0)
    checkpoint_every: int = Field(default=200, ge=0, description="checkpoint every N steps (0: only at the end)")
    peak_tflops: float | None = Field(
        default=None, gt=0,
        description="device peak for MFU; None: the table in moe_study/train/trainlog.py (CPU: MFU null)")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        batch_split(self.batch_size, self.gpus, self.micro_batch_size)
        if self.compile_mode is not None and self.compile is False:
            raise ValueError(f"compile_mode={self.compile_mode!r} needs compile: true (or auto)")
        return self


class EvalConfig(Strict):
    batch_size: int = Field(default=16, gt=0)
    max_tokens: int | None = Field(default=None, gt=0, description="cap on held-out tokens scored")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap resamples for the interval")
    seed: int = Field(default=0, description="seeds the bootstrap and the max_tokens document subset")
    task_items: int = Field(
        default=3000, ge=0, le=1_000_000,
        description="items per zero-shot task (sentence-final-word cloze, 4-way continuation choice) built from "
        "held-out documents by the tasks stage; fewer when the held-out set has fewer candidates; 0 = no tasks")
    task_seed: int = Field(default=0, description="seeds which held-out positions and distractors the tasks use")
    choice_words: int = Field(default=8, ge=1, le=64,
                              description="words in each ending of the 4-way continuation-choice task")
    min_context_words: int = Field(default=6, ge=1, le=256,
                                   description="words of context that precede every task item at least")


class ExportConfig(Strict):
    """The export@run stage (stages/export.py, moe_study/hf.py): each trained run as a Hugging Face
    checkpoint in work/runs/<run>/hf/. Off by default: the stage then writes only a one-line record."""

    enabled: bool = Field(default=False, description="write the transformers checkpoint of every run")
    check_tokens: int = Field(default=64, ge=0, le=4096, description="tokens on which the reloaded checkpoint's "
                              "logits must equal the run's (max |diff| <= 1e-4); 0 = no check")


# ------------------------------------------------------------------------------------------ root
class Params(Strict):
    study: str = Field(pattern=STUDY_NAME, description="results go to results/<study>/")
    seed: int = 0
    corpus: CorpusConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    dedupe: DedupeConfig = DedupeConfig()
    split: SplitConfig = SplitConfig()
    budget: BudgetConfig
    model: ModelConfig = ModelConfig()
    runs: dict[str, RunConfig] = Field(min_length=1)
    router: RouterConfig = RouterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="before")
    @classmethod
    def _expand_lr_grids(cls, data: object) -> object:
        return expand_lr_grids(data)

    @field_validator("runs")
    @classmethod
    def _run_names(cls, runs: dict[str, RunConfig]) -> dict[str, RunConfig]:
        for name in runs:
            if not RUN_NAME.fullmatch(name):
                raise ValueError(f"run name {name!r} must match {RUN_NAME.pattern} (it becomes a path)")
        return runs

    @model_validator(mode="after")
    def _sizes(self) -> Params:
        for name, size in self.budget.sizes.items():
            try:
                ModelConfig.model_validate({**self.model.model_dump(), **size.model})
            except ValidationError as err:
                e = err.errors()[0]
                loc = ".".join(str(x) for x in e["loc"])
                msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
                raise ValueError(f"budget.sizes.{name}.model{'.' + loc if loc else ''}: {msg}") from None
        for name, r in self.runs.items():
            if r.size is not None and r.size not in self.budget.sizes:
                raise ValueError(f"runs.{name}.size={r.size!r} is not in budget.sizes {sorted(self.budget.sizes)}")
        return self

    def run_size(self, name: str) -> tuple[ModelConfig, float, float]:
        """(model, N, C) of a run: its size's (budget.sizes) or the study's; C x runs.<name>.compute_scale."""
        r = self.run(name)
        if r.size is None:
            model, params, compute = self.model, self.budget.params, self.budget.compute
        else:
            s = self.budget.sizes[r.size]
            model = ModelConfig.model_validate({**self.model.model_dump(), **s.model})
            params, compute = s.params, s.compute
        return model, params, compute * r.compute_scale

    def run(self, name: str) -> RunConfig:
        if name not in self.runs:
            raise KeyError(f"run {name!r} is not in params.yaml runs: {sorted(self.runs)}")
        return self.runs[name]

    def run_lr(self, name: str) -> float:
        return self.run(name).lr or self.train.lr

    def run_seed(self, name: str) -> int:
        r = self.run(name)
        return self.train.seed if r.seed is None else r.seed


def expand_lr_grids(data: object) -> object:
    """A raw params mapping with `runs.<name>.lr_grid` (or `train.lr_grid`, for runs that set neither lr nor
    lr_grid) expanded: one run per value, named <name>_lr<lr_tag(value)>, with that lr and the group of the
    run (default <name>). Anything malformed is left in place for the field validators to name."""
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        return data
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    study_grid = train.get("lr_grid")
    runs: dict[str, object] = {}
    for name, r in data["runs"].items():
        if not isinstance(r, dict) or (r.get("lr_grid") is None and (study_grid is None or "lr" in r)):
            runs[name] = r
            continue
        grid = r.get("lr_grid") if r.get("lr_grid") is not None else study_grid
        ok = (isinstance(grid, list) and grid and "lr" not in r and len(set(map(str, grid))) == len(grid)
              and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in grid))
        if not ok:
            runs[name] = r  # the field validators name what is wrong
            continue
        for lr in grid:
            derived = f"{name}_lr{lr_tag(lr)}"
            if derived in data["runs"] or derived in runs:
                raise ValueError(f"runs.{name}.lr_grid: the derived run name {derived!r} is taken")
            # a deep copy: runs sharing one list (e.g. `vary`) would be dumped by --expand as a YAML anchor,
            # which the params loader refuses
            runs[derived] = {**copy.deepcopy({k: v for k, v in r.items() if k != "lr_grid"}), "lr": float(lr),
                             "group": r.get("group") or name}
    return {**data, "runs": runs}


def lr_tag(lr: object) -> str:
    """A learning rate as a run-name suffix: 3e-3 -> '3e-3', 1.5e-3 -> '1p5e-3' (no dots in names)."""
    if not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"lr_grid value {lr!r} must be a positive number")
    mant, exp = f"{float(lr):.6e}".split("e")
    mant = mant.rstrip("0").rstrip(".").replace(".", "p")
    return f"{mant}e{int(exp)}"


class ParamsError(ValueError):
    """A params.yaml that fails validation; the message names the file, field and reason."""


def _format(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not in the schema; check for a typo)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_params(data: object, path: Path | str = "params.yaml") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format(err, Path(path))) from None
