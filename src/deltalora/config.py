"""Stage configs: one small frozen dataclass per stage, every field documented and validated.

A ``Preset`` bundles them with the base model and the task pool; the named presets are
in ``deltalora.presets``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from deltalora.errors import require as _check
from deltalora.experiments.config import ExperimentConfig
from deltalora.generator.config import GeneratorConfig

__all__ = [
    "DeltaConfig",
    "ExperimentConfig",
    "GeneratorConfig",
    "Preset",
    "ProtocolConfig",
    "RuntimeConfig",
    "TaskConfig",
    "ZooConfig",
]


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
    evaluate: bool = True
    """Score the base model and each run's final checkpoint on validation and test (the protocol's LoRAs,
    compared by their δ only, skip it)."""
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
class ProtocolConfig:
    """The Delta Activations paper's protocol (``deltalora delta protocol``): LoRAs on disjoint parts of a
    task's train split, once with the zoo's shared ``lora_A`` init and once with an init per task."""

    tasks_per_family: int = 3
    """Selected tasks per family: those of the preset's pairs first, then the best by validation gain."""
    parts: int = 3
    """Disjoint parts of each task's train split, one LoRA each (the paper: 3)."""
    steps: int = 12
    """Optimizer steps of every part's LoRA and of each union adapter (the zoo's batch size and lr)."""
    probe_sizes: tuple[int, ...] = (1, 5, 20)
    """Probe-set sizes whose δ are compared."""
    permutations: int = 1000
    """Label shuffles of each permutation null."""

    def __post_init__(self) -> None:
        _check(self.tasks_per_family >= 2, "protocol.tasks_per_family must be >= 2")
        _check(self.parts >= 2, "protocol.parts must be >= 2 (silhouette by task needs two LoRAs per task)")
        _check(self.steps >= 1, "protocol.steps must be >= 1")
        _check(
            bool(self.probe_sizes) and all(p in (1, 5, 20) for p in self.probe_sizes),
            "protocol.probe_sizes must be among 1, 5, 20",
        )
        _check(self.permutations >= 1, "protocol.permutations must be >= 1")


DEVICE_FORM = "auto, cpu, cuda or cuda:N"
"""The accepted forms of ``--device`` (``runtime.device``)."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Where every stage computes and in what precision (``--device``, ``--dtype``; ``deltalora.device``).

    Speed only, as far as a workspace is concerned: a zoo or a generator started on one device resumes on another.
    """

    device: str = "cpu"
    """auto (CUDA when present), cpu, cuda or cuda:N. Under torchrun each rank takes its LOCAL_RANK GPU."""
    dtype: str = "fp32"
    """fp32, or bf16: autocast (CUDA only) over the training forwards of zoo LoRAs and of the generator network;
    δ (targets, exact-δ and KL terms) and all scoring stay fp32."""

    def __post_init__(self) -> None:
        _check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"--device (runtime.device) must be {DEVICE_FORM}, got {self.device!r}",
        )
        _check(self.dtype in ("fp32", "bf16"), f"--dtype (runtime.dtype) must be fp32 or bf16, got {self.dtype!r}")


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
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

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
        return config_from_dict(cls, d)

    def replace(self, **changes: Any) -> Preset:
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """A config dataclass from its ``dataclasses.asdict`` (lists back to tuples, nested sections back to configs),
    validated; fields it lacks take their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, typ = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ):
            v = config_from_dict(typ, v)
        elif typing.get_origin(typ) is tuple:
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kwargs[f.name] = v
    return cls(**kwargs)
