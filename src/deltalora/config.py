"""Stage configs: one small frozen dataclass per stage, every field documented and validated.

A ``Preset`` bundles them with the base model and the task pool; the named presets are
in ``deltalora.presets``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from deltalora.errors import ConfigError
from deltalora.generator.variants import VARIANTS


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TaskConfig:
    """How task items are split into train and test."""

    split_seed: int = 0
    """Seed of the deterministic train/test shuffle (mixed with the task name)."""
    max_test: int = 200
    """Cap on test items per task (200+ keeps the accuracy standard error near 3 points)."""
    max_test_fraction: float = 0.5
    """Never put more than this fraction of a task's items into test."""
    max_train: int = 1000
    """Cap on train items per task."""
    family_domains: bool = False
    """Label each BIG-bench task by its family (the folder before the subtask, e.g. ``arithmetic``) rather
    than by the registry's hand-made domain."""
    n_val: int = 0
    """Validation items carved from the train side (never from test): the split on which tasks are
    selected and generators are tuned. 0 = none (the train split is then what it always was)."""
    min_items: int = 8
    """A task with fewer items than this is rejected."""

    def __post_init__(self) -> None:
        _check(self.max_test >= 1, "tasks.max_test must be >= 1")
        _check(0.0 < self.max_test_fraction < 1.0, "tasks.max_test_fraction must be in (0, 1)")
        _check(self.max_train >= 1, "tasks.max_train must be >= 1")
        _check(self.min_items >= 2, "tasks.min_items must be >= 2")
        _check(self.n_val >= 0, "tasks.n_val must be >= 0")


@dataclass(frozen=True)
class ZooConfig:
    """How each reference LoRA of the zoo is trained and checkpointed."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the linear modules that get a LoRA."""
    steps: int = 50
    """Optimizer steps per adapter."""
    batch_size: int = 8
    """Sequences per step."""
    lr: float = 1e-3
    """AdamW learning rate (constant after a short warm-up)."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 128
    """Prompt + answer tokens kept per sequence (prompt truncated from the left)."""
    seeds: tuple[int, ...] = (0,)
    """One adapter per task and seed. More seeds can be added to a built zoo later (resumable)."""
    keep_last: int = 5
    """K checkpoints kept, the last at the final step."""
    save_every: int = 1
    """Spacing in steps between the kept checkpoints: 1 takes the last K steps (as DnD collects them);
    steps / K spreads them over training, so they show how far a task's weights move."""
    parts: int = 1
    """Disjoint parts of each task's train split, one LoRA per part and seed (3: the Delta Activations
    paper's protocol of three LoRAs per dataset)."""
    min_gain: float = 0.05
    """A task is selected when its LoRA beats the base model by at least this accuracy on the validation
    split (on test when the preset has none, as the ``small`` pool was chosen)."""
    pair_steps: int = 50
    """Steps for the adapters trained on the union of two tasks."""
    eval_batch_size: int = 32
    """Sequences per forward pass when scoring test items."""
    init_per_task: bool = False
    """Seed each LoRA's init from (task, seed) rather than the seed alone. Off, every task starts
    from the same lora_A basis, so weight-space targets share coordinates across tasks."""
    micro_batch: int = 8
    """Length-sorted sequences per forward pass inside a step (less padding; same gradient)."""
    min_shared_prefix: int = 8
    """Run a token prefix common to a whole micro-batch once and share its keys/values when it
    is at least this long (same loss and gradient, fewer FLOPs); 0 turns sharing off."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "zoo.rank must be >= 1")
        _check(self.alpha > 0, "zoo.alpha must be > 0")
        _check(len(self.target_modules) >= 1, "zoo.target_modules must name at least one module")
        _check(self.steps >= 1 and self.pair_steps >= 1, "zoo.steps and zoo.pair_steps must be >= 1")
        _check(self.batch_size >= 1, "zoo.batch_size must be >= 1")
        _check(self.lr > 0, "zoo.lr must be > 0")
        _check(self.warmup_steps >= 0, "zoo.warmup_steps must be >= 0")
        _check(self.max_length >= 8, "zoo.max_length must be >= 8")
        _check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "zoo.seeds must be distinct and non-empty"
        )
        _check(self.keep_last >= 1 and self.save_every >= 1, "zoo.keep_last and zoo.save_every must be >= 1")
        _check(self.parts >= 1, "zoo.parts must be >= 1")
        _check(
            (self.keep_last - 1) * self.save_every < min(self.steps, self.pair_steps),
            "zoo.keep_last checkpoints spaced zoo.save_every apart must fit in zoo.steps",
        )
        _check(self.eval_batch_size >= 1, "zoo.eval_batch_size must be >= 1")
        _check(self.micro_batch >= 1, "zoo.micro_batch must be >= 1")
        _check(self.min_shared_prefix >= 0, "zoo.min_shared_prefix must be >= 0 (0: no prefix sharing)")

    def checkpoint_steps(self, steps: int) -> list[int]:
        """The steps at which checkpoints are kept, ending with the final step."""
        return [steps - i * self.save_every for i in reversed(range(self.keep_last))]


@dataclass(frozen=True)
class DeltaConfig:
    """How Delta Activations are computed."""

    n_probes: int = 5
    """Probe prompts: 1, 5 (the paper's default) or 20."""
    batch_size: int = 20
    """Probe prompts per forward pass (left-padded; equal to one at a time)."""

    def __post_init__(self) -> None:
        _check(self.n_probes in (1, 5, 20), "delta.n_probes must be 1, 5 or 20")
        _check(self.batch_size >= 1, "delta.batch_size must be >= 1")


@dataclass(frozen=True)
class GeneratorConfig:
    """How a prompt-to-LoRA generator is built and trained (the variants: ``deltalora.generator.variants``)."""

    variant: str = "dnd"
    """A name in the variant table: dnd (weight MSE), A1 (+ δ-head), A2 (+ exact δ), B (prompts -> δ -> LoRA),
    C (δ + KL first)."""
    n_prompts: int = 32
    """N prompts per condition batch, drawn fresh from a task's train split every step."""
    channels: tuple[int, ...] = (64, 256)
    """Hidden channel counts of the hyper-convolutional decoder (between N and the T tokens)."""
    steps: int = 300
    """Optimizer steps (for B: of stage 2, the decoder G_θ)."""
    stage1_steps: int = 300
    """Variant B only: steps training E_ψ (prompts -> δ) before G_θ."""
    batch_size: int = 4
    """(prompt batch, checkpoint) samples per step."""
    lr: float = 1e-3
    """AdamW peak learning rate (cosine schedule after warm-up)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    lambda_w: float = 1.0
    """Weight of the token MSE (the only loss of dnd; a regulariser for C)."""
    lambda_delta: float = 1.0
    """Weight of the δ loss (A1: predicted by H, A2 and C: exact)."""
    lambda_cons: float = 0.1
    """Variant B: weight of the exact-δ consistency term of G_θ."""
    lambda_kl: float = 1.0
    """Variant C: weight of KL(base+generated || base+reference) at the answer position."""
    kl_prompts: int = 4
    """Variant C: task prompts per sample for the KL term."""
    exact_samples: int = 0
    """Samples per step that get the exact-δ / KL terms (A2, B, C); 0 = the whole batch. Each costs a
    forward and backward of the probes through the base model, the dominant cost on a CPU."""
    n_probes: int = 5
    """Probe set of the δ targets and of the exact δ (1, 5 or 20)."""
    cond_noise: float = 1e-4
    """Std of Gaussian noise added to prompt embeddings during training."""
    target_noise: float = 1e-5
    """Std of Gaussian noise added to target tokens during training."""
    shuffle_delta: bool = False
    """Negative control: δ targets permuted across tasks."""
    data_fraction: float = 1.0
    """RQ3: fraction of each task's checkpoints and train prompts the generator may use (at least one of each)."""
    weight_noise: float = 0.0
    """RQ3: std of fixed Gaussian noise on the reference tokens (in units of each position's zoo std);
    the δ targets are re-measured on the noisy adapters, as a real noisy zoo would give them."""
    mislabel_fraction: float = 0.0
    """RQ3: fraction of checkpoints whose weights and δ are replaced by another task's (a mislabelled zoo)."""
    save_every: int = 50
    """Steps between resumable training checkpoints."""
    seed: int = 0
    """Seed of initialisation, sampling and noise."""

    def __post_init__(self) -> None:
        _check(
            self.variant in VARIANTS, f"generator.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
        )
        _check(1 <= self.n_prompts <= 512, "generator.n_prompts must be in [1, 512]")
        _check(all(c >= 1 for c in self.channels), "generator.channels must be positive")
        _check(self.steps >= 1 and self.stage1_steps >= 0, "generator.steps must be >= 1 and stage1_steps >= 0")
        _check(self.batch_size >= 1, "generator.batch_size must be >= 1")
        _check(self.lr > 0 and self.weight_decay >= 0, "generator.lr must be > 0 and weight_decay >= 0")
        _check(
            min(self.lambda_w, self.lambda_delta, self.lambda_cons, self.lambda_kl) >= 0,
            "generator loss weights must be >= 0",
        )
        _check(self.n_probes in (1, 5, 20), "generator.n_probes must be 1, 5 or 20")
        _check(self.kl_prompts >= 1, "generator.kl_prompts must be >= 1")
        _check(0 <= self.exact_samples <= self.batch_size, "generator.exact_samples must be in [0, batch_size]")
        _check(self.cond_noise >= 0 and self.target_noise >= 0, "generator noise levels must be >= 0")
        _check(self.save_every >= 1, "generator.save_every must be >= 1")
        _check(0 < self.data_fraction <= 1, "generator.data_fraction must be in (0, 1]")
        _check(self.weight_noise >= 0, "generator.weight_noise must be >= 0")
        _check(0 <= self.mislabel_fraction < 1, "generator.mislabel_fraction must be in [0, 1)")


@dataclass(frozen=True)
class ExperimentConfig:
    """The research-question grid run by ``deltalora experiment`` (cells, budgets, controls)."""

    held_out: tuple[str, ...] = ()
    """RQ2: pool tasks left out of generator training; each domain keeps other training tasks."""
    seen_eval: tuple[str, ...] = ()
    """RQ1: training tasks whose test items are scored."""
    lodo_domain: str = ""
    """RQ2: the domain left out of training entirely ("" skips leave-one-domain-out)."""
    lodo_eval: tuple[str, ...] = ()
    """Tasks of that domain that are scored."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Generator variants of the main grid (RQ1, RQ2 held-out tasks)."""
    lodo_variants: tuple[str, ...] = ("dnd", "A2")
    """Variants trained for leave-one-domain-out."""
    seeds: tuple[int, ...] = (0, 1)
    """Generator seeds of every cell."""
    draws: int = 5
    """Generated adapters per task and generator seed, each from its own train-split prompt draw."""
    n_test: int = 20
    """Test items scored per task (the same items for every method)."""
    n_kl: int = 8
    """Test prompts on which the answer-position KL to the reference adapter is measured."""
    steps: int = 100
    """Generator optimizer steps of every cell (variant B: also its stage-1 steps)."""
    long_steps: int = 1500
    """dnd is also trained for this many steps, about the wall time of an exact-δ variant at ``steps``
    on a CPU (a compute-matched baseline; 0 skips it)."""
    rq3_variants: tuple[str, ...] = ("dnd", "A2")
    """Variants of the data-scarcity and noisy-target cells."""
    fractions: tuple[float, ...] = (0.25,)
    """RQ3: data fractions below 100% (100% is the main grid)."""
    weight_noise: tuple[float, ...] = (1.0,)
    """RQ3: Gaussian noise levels on the reference tokens."""
    mislabel: tuple[float, ...] = (0.25,)
    """RQ3: fractions of mislabelled checkpoints."""
    ablation_variant: str = "A2"
    """The δ variant whose probe-set size and λ_δ are varied, and whose δ targets are shuffled."""
    probe_sizes: tuple[int, ...] = (1, 20)
    """Ablation: probe-set sizes besides the default."""
    lambdas: tuple[float, ...] = (0.3, 3.0)
    """Ablation: λ_δ values besides the default."""
    interpolations: tuple[float, ...] = (0.25, 0.5, 0.75)
    """RQ4: α in G_θ(α·δ_a + (1-α)·δ_b)."""
    mixed_variants: tuple[str, ...] = ("dnd", "A2", "B")
    """RQ4: variants given half the prompts from each task of a pair."""

    def __post_init__(self) -> None:
        _check(
            not set(self.held_out) & set(self.seen_eval),
            "experiment.held_out and experiment.seen_eval must not overlap",
        )
        for v in (*self.variants, *self.lodo_variants, *self.rq3_variants, *self.mixed_variants, self.ablation_variant):
            _check(v in VARIANTS, f"experiment: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        _check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
            "experiment.seeds must be distinct and non-empty",
        )
        _check(
            self.draws >= 1 and self.n_test >= 1 and self.n_kl >= 1 and self.steps >= 1,
            "experiment.draws, n_test, n_kl and steps must be >= 1",
        )
        _check(all(0 < f < 1 for f in self.fractions), "experiment.fractions must be in (0, 1)")
        _check(self.long_steps >= 0, "experiment.long_steps must be >= 0")
        _check(all(0 <= a <= 1 for a in self.interpolations), "experiment.interpolations must be in [0, 1]")
        _check(all(p in (1, 5, 20) for p in self.probe_sizes), "experiment.probe_sizes must be 1, 5 or 20")


@dataclass(frozen=True)
class Preset:
    """Everything one pipeline run needs."""

    name: str
    """Preset name, recorded with every artifact."""
    base: str
    """Base model: a known name, a Hugging Face id or a local folder."""
    pool: tuple[str, ...]
    """Task names trained into the zoo."""
    pairs: tuple[tuple[str, str], ...] = ()
    """Task pairs whose union gets its own adapter (additivity, composition)."""
    tasks: TaskConfig = field(default_factory=TaskConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    def __post_init__(self) -> None:
        _check(len(self.pool) >= 1, "preset.pool must name at least one task")
        _check(len(set(self.pool)) == len(self.pool), "preset.pool has duplicate tasks")
        for a, b in self.pairs:
            _check(
                a in self.pool and b in self.pool and a != b,
                f"preset.pairs: ({a}, {b}) must be two distinct pool tasks",
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved next to every artifact."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        """The inverse of ``to_dict`` (lists back to tuples, sections back to their configs), validated."""
        return _from_dict(cls, d)

    def replace(self, **changes: Any) -> Preset:
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, typ = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ):
            v = _from_dict(typ, v)
        elif typing.get_origin(typ) is tuple:
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kwargs[f.name] = v
    return cls(**kwargs)
