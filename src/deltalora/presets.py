"""Named presets and ``--set`` overrides.

``tiny`` runs the whole pipeline on a random in-memory llama in seconds (tests); ``small``
is the CPU default on SmolLM2-135M; ``families`` grows the zoo to families of sibling BIG-bench
subtasks, selected on a validation split; ``gpu`` is ``small`` with the research grid a CPU
cannot afford, on one CUDA GPU; ``families-gpu`` is the cross-validation on the families zoo that the CPU
cannot afford (every variant from scratch on every fold, every family held out), on one CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import typing

from deltalora.config import (
    DeltaConfig,
    ExperimentConfig,
    GeneratorConfig,
    Preset,
    RuntimeConfig,
    TaskConfig,
    ZooConfig,
)
from deltalora.data.registry import DEFAULT_POOL, FAMILY_CANDIDATES, FAMILY_PAIRS, PAIRS, TINY_PAIRS, TINY_POOL
from deltalora.errors import ConfigError

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        base="tiny",
        pool=TINY_POOL,
        pairs=TINY_PAIRS,
        tasks=TaskConfig(max_test=16, max_train=64, min_items=8),
        zoo=ZooConfig(
            rank=2,
            alpha=4.0,
            steps=6,
            batch_size=4,
            lr=1e-2,
            warmup_steps=1,
            max_length=48,
            seeds=(0,),
            keep_last=2,
            pair_steps=4,
            eval_batch_size=16,
            min_gain=-1.0,  # a random model's LoRAs gain nothing: keep every task
        ),
        delta=DeltaConfig(n_probes=5, batch_size=5),
        generator=GeneratorConfig(
            n_prompts=4,
            channels=(8,),
            steps=8,
            stage1_steps=8,
            batch_size=2,
            lr=3e-3,
            warmup_steps=1,
            kl_prompts=2,
            save_every=4,
        ),
        experiment=ExperimentConfig(
            held_out=("syn.parity",),
            seen_eval=("syn.add", "syn.copy"),
            lodo_domain="strings",
            lodo_eval=("syn.copy",),
            seeds=(0, 1),
            draws=2,
            n_test=6,
            n_kl=2,
            steps=3,
            long_steps=6,
            rq3_variants=("dnd",),
            mislabel=(0.5,),
            probe_sizes=(1,),
            lambdas=(3.0,),
            interpolations=(0.5,),
            mixed_variants=("dnd",),
        ),
    ),
    "small": Preset(
        name="small",
        base="smollm2-135m",
        pool=DEFAULT_POOL,
        pairs=PAIRS,
        generator=GeneratorConfig(exact_samples=1),
        experiment=ExperimentConfig(
            held_out=(
                "arithmetic.3_digit_subtraction",
                "linguistic_mappings.question_formation_json",
                "movie_recommendation",
                "unit_conversion.novel_systems",
            ),
            seen_eval=(
                "arithmetic.2_digit_addition",
                "cs_algorithms.valid_parentheses",
                "linguistic_mappings.plural_json",
                "intent_recognition",
                "unit_conversion.si_conversion",
            ),
            lodo_domain="science",
            lodo_eval=("unit_conversion.si_conversion", "unit_conversion.novel_systems"),
        ),
    ),
    # Sibling subtasks of BIG-bench families, selected on a validation split; LoRAs with checkpoints spread
    # over training (steps 8, 16, 24). About 2-3 min per task on 2 CPU cores (the README gives the measured time).
    "families": Preset(
        name="families",
        base="smollm2-135m",
        pool=tuple(s.name for s in FAMILY_CANDIDATES),
        pairs=FAMILY_PAIRS,
        tasks=TaskConfig(max_test=100, max_train=600, n_val=50, family_domains=True),
        zoo=ZooConfig(steps=24, keep_last=3, save_every=8, pair_steps=24, max_length=112, eval_batch_size=256),
        # chosen on validation with `deltalora select` (results/selection_families_partial*.json): the basis head
        # by validation loss; final-checkpoint targets and 3000 steps by accuracy on the training tasks'
        # validation items (0.93 of their own LoRAs' vs 0.79 with every checkpoint at 1500 steps)
        generator=GeneratorConfig(head="basis", val_every=100, exact_samples=1, checkpoints_per_run=1),
        # cross-validation only (`--only cv`): 4 folds, every task held out once; the headline rows on 3 seeds
        experiment=ExperimentConfig(
            folds=4,
            cv_variants=("dnd",),
            seeds=(0, 1, 2),
            draws=1,
            n_test=50,
            steps=3000,
            long_steps=0,
            cv_control_seeds=1,
        ),
    ),
}
# The small zoo with the grid a CPU cannot afford: 3 generator seeds, 100 test items per task, 3x the generator
# steps, every sweep at its full list. Not run end to end yet; the H100's measured unit costs that size it are in
# results/device_nvidia-h100-80gb-hbm3.json (README, "GPU").
PRESETS["gpu"] = PRESETS["small"].replace(
    name="gpu",
    runtime=RuntimeConfig(device="cuda"),
    experiment=dataclasses.replace(
        PRESETS["small"].experiment,
        seeds=(0, 1, 2),
        n_test=100,
        draws=3,
        steps=300,
        fractions=(0.1, 0.25, 0.5),
        weight_noise=(0.5, 1.0),
        mislabel=(0.1, 0.25),
    ),
)


# The families cross-validation with the cells the CPU cannot give (E2E and E2E+delta from scratch are 22x and 36.5x a
# dnd step here, about 85 h of CPU for 4 folds x 3 seeds; results/bench_families.json): every δ and end-to-end
# variant from scratch on all 4 folds (3 seeds), every family the zoo selected held out in turn, B from scratch and
# RQ3 on fold 0 (3 seeds). Its zoo is `families`' (`--workspace runs/families` reuses a zoo built on the CPU).
PRESETS["families-gpu"] = PRESETS["families"].replace(
    name="families-gpu",
    runtime=RuntimeConfig(device="cuda"),
    experiment=dataclasses.replace(
        PRESETS["families"].experiment,
        cv_variants=("dnd", "A2", "A2-lin", "E2E", "E2E+delta"),
        cv_lofo=(  # the 11 families with selected tasks (results/zoo_families.json)
            "arithmetic",
            "bbq_lite_json",
            "color",
            "elementary_math_qa",
            "intersect_geometry",
            "linguistic_mappings",
            "list_functions",
            "modified_arithmetic",
            "multiemo",
            "unit_conversion",
            "unnatural_in_context_learning",
        ),
        cv_scratch_variants=("B",),
        cv_rq3=True,
        rq3_variants=("dnd", "A2", "A2-lin"),  # the variants with weight targets, which the conditions corrupt
        cv_warm_seeds=3,
    ),
)


SECTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(Preset) if f.default_factory is not dataclasses.MISSING
)
"""The preset's stage sections that ``--set section.field=value`` reaches."""


def with_pool(preset: Preset, names: str) -> Preset:
    """The preset with its task pool replaced by comma-separated ``names``, keeping the pairs whose two tasks remain."""
    pool = tuple(n.strip() for n in names.split(",") if n.strip())
    return preset.replace(pool=pool, pairs=tuple(p for p in preset.pairs if set(p) <= set(pool)))


def get_preset(name: str) -> Preset:
    """The named preset, or an error listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """``section.field=value`` overrides, e.g. ``zoo.steps=10`` or ``zoo.seeds=0,1``; ``pool=a,b,c``
    replaces the task pool and keeps the preset's pairs whose two tasks are both still in it."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if key == "pool" and sep:
            preset = with_pool(preset, value)
            continue
        section, _, name = key.partition(".")
        if not sep or not name or section not in SECTIONS:
            raise ConfigError(f"override {ov!r}: expected {'|'.join(SECTIONS)}.<field>=<value> or pool=<task>,<task>")
        sub = getattr(preset, section)
        fields = {f.name: f for f in dataclasses.fields(sub)}
        if name not in fields:
            raise ConfigError(f"override {ov!r}: {section} has no field {name!r}; fields: {', '.join(fields)}")
        hints = typing.get_type_hints(type(sub))
        typ = hints[name]
        try:
            if typing.get_origin(typ) is tuple:
                inner = typing.get_args(typ)[0]
                parsed = tuple(inner(v) for v in value.split(",") if v)
            elif typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                parsed = value.lower() in ("true", "1")
            else:
                parsed = typ(value)
        except ValueError as e:
            raise ConfigError(f"override {ov!r}: {value!r} is not a valid {typ}") from e
        preset = preset.replace(**{section: dataclasses.replace(sub, **{name: parsed})})
    return preset
