"""The research grid's config (``Preset.experiment``)."""

from __future__ import annotations

from dataclasses import dataclass

from deltalora.errors import require as _check
from deltalora.generator.variants import VARIANTS, baseline, weighted_by


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
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS.values() if v.in_grid)
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
    """Test items on whose gold-answer tokens (teacher-forced, averaged over all of them) the KL to the reference
    adapter is measured."""
    steps: int = 100
    """Generator optimizer steps of every cell (variant B: also its stage-1 steps)."""
    long_steps: int = 1500
    """dnd is also trained for this many steps, about the wall time of an exact-δ variant at ``steps``
    on a CPU (a compute-matched baseline; 0 skips it)."""
    mixture_k: int = 3
    """Top-k retrieval mixture: training tasks whose adapters are summed (more than there are: all of them)."""
    mixture_temperature: float = 0.05
    """Top-k retrieval mixture: weights are softmax(cosine / this), not normalised cosines (which are nearly equal
    for k related tasks): at 0.05 a neighbour 0.1 nearer in cosine weighs e² ≈ 7.4x more."""
    multitask_step_factor: float = 3.0
    """Multi-task LoRA: optimizer steps = the zoo's steps x this. Each step draws a batch from the union, so at
    1x every task gets a fraction of one zoo adapter's updates, and per-task parity (x the number of training
    tasks) costs as much as retraining the zoo; 3x is a fixed, affordable middle that still trains the one
    rank-r LoRA longer than any single reference adapter."""
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
    kl_lambdas: tuple[float, ...] = ()
    """Ablation: λ_KL values of variant C besides the default (its distillation weight)."""
    interpolations: tuple[float, ...] = (0.25, 0.5, 0.75)
    """RQ4: α in G_θ(α·δ_a + (1-α)·δ_b)."""
    mixed_variants: tuple[str, ...] = ("dnd", "A2", "B")
    """RQ4: variants given half the prompts from each task of a pair."""

    folds: int = 0
    """Cross-validation (``--only cv``): tasks dealt into this many folds stratified by domain, each held out
    once from every generator and baseline; 0 = none."""
    fold_seed: int = 0
    """Seed of the fold assignment."""
    cv_variants: tuple[str, ...] = ("dnd",)
    """Generators trained in every fold; each is compared with every baseline but the oracle (Holm over all)."""
    cv_warm_variants: tuple[str, ...] = ()
    """Cross-validation: variants trained from the fold's converged baseline generator (same seed) for
    ``warm_steps`` steps, beside the baseline continued for the same steps (the same-steps control)."""
    warm_steps: int = 200
    """Steps of every warm-started generator."""
    warm_long_steps: int = 0
    """Cross-validation: the baseline is also continued for this many steps from the same start, about the wall
    time of the costliest warm-started variant (the compute-matched control; 0 skips it)."""
    cv_warm_ablations: bool = False
    """Cross-validation: the ablations (``ablation_variant`` with δ shuffled across tasks, each of
    ``probe_sizes`` and ``lambdas``; C at each of ``kl_lambdas``) are warm-started too, each compared with its
    variant's own warm-started row."""
    cv_warm_pairs: tuple[str, ...] = ()
    """Cross-validation: further declared comparisons between warm-started variants, each ``a:b`` (a minus b),
    e.g. ``E2E+delta:E2E`` (does δ change the end-to-end variant) or ``A1:A2`` (δ-head vs exact δ)."""
    cv_scratch_variants: tuple[str, ...] = ()
    """Cross-validation: variants trained from scratch on the first ``cv_warm_folds`` folds (with ``cv_warm_seeds``
    seeds), each compared with the baseline variant: those that cannot start from it (B, whose G_θ reads δ)."""
    cv_rq3: bool = False
    """Cross-validation: RQ3 on the first ``cv_warm_folds`` folds: each ``rq3_variants`` generator trained from
    scratch on ``task_fractions`` of the training tasks, on weights with noise (``weight_noise``) and on
    mislabelled weights (``mislabel``), both with every δ target kept true; each δ variant is compared with the
    baseline under the same condition."""
    task_fractions: tuple[float, ...] = (0.25, 0.5)
    """RQ3 in cross-validation: fractions of the fold's training tasks (each family keeps ceil(f·n), nested)."""
    cv_warm_seeds: int = 0
    """Cross-validation: generator seeds of the warm-started and RQ3 rows (the first this many of ``seeds``; 0: all)."""
    cv_warm_folds: int = 1
    """Folds (the first ones) whose tasks score the warm-started variants and the RQ3 rows (their steps run the
    base model)."""
    cv_lofo: tuple[str, ...] = ()
    """Cross-validation: families held out entirely, one at a time (leave-one-family-out): every baseline and
    each ``cv_variants`` generator is built from all other families and scores the family's tasks (rows named
    ``<method>, held-out family``); each variant is compared with each baseline but the oracle on them."""
    cv_control_seeds: int = 0
    """Cross-validation: generator seeds scored from other-family and random-text prompts (the first this many of
    ``seeds``; 0: all). Prompt sensitivity is tested across tasks, so one seed per task is a paired design; the
    seed mean matters for the headline rows, which always use every seed."""

    def __post_init__(self) -> None:
        _check(
            not set(self.held_out) & set(self.seen_eval),
            "experiment.held_out and experiment.seen_eval must not overlap",
        )
        _check(self.folds == 0 or self.folds >= 2, "experiment.folds must be 0 (off) or >= 2")
        _check(self.cv_control_seeds >= 0, "experiment.cv_control_seeds must be >= 0 (0: every seed)")
        _check(self.warm_steps >= 1 and self.cv_warm_folds >= 1, "experiment.warm_steps and cv_warm_folds must be >= 1")
        _check(
            self.warm_long_steps >= 0 and self.cv_warm_seeds >= 0,
            "experiment.warm_long_steps and cv_warm_seeds must be >= 0",
        )
        if self.cv_warm_ablations:
            kl = (weighted_by("lambda_kl").name,) if self.kl_lambdas else ()
            need = {self.ablation_variant, *kl} - set(self.cv_warm_variants)
            _check(
                not need,
                f"experiment.cv_warm_ablations compares each ablation with its variant's warm-started row: add "
                f"{', '.join(sorted(need))} to experiment.cv_warm_variants",
            )
        _check(all(x > 0 for x in self.kl_lambdas), "experiment.kl_lambdas must be > 0")
        _check(len(set(self.cv_lofo)) == len(self.cv_lofo), "experiment.cv_lofo must name each family once")
        _check(
            not set(self.cv_scratch_variants) & {*self.cv_variants, baseline().name},
            "experiment.cv_scratch_variants: a variant trained on every fold (cv_variants), or the baseline variant, "
            "has its rows already",
        )
        _check(all(0 < f < 1 for f in self.task_fractions), "experiment.task_fractions must be in (0, 1)")
        if self.cv_rq3:
            base = baseline().name
            _check(
                base in self.rq3_variants and base in self.cv_variants,
                f"experiment.cv_rq3 compares each δ variant with {base} under the same condition: {base} must be in "
                "experiment.rq3_variants and experiment.cv_variants",
            )
        for pair in self.cv_warm_pairs:
            _check(
                len(pair.split(":")) == 2 and set(pair.split(":")) <= set(self.cv_warm_variants),
                f"experiment.cv_warm_pairs: {pair!r} must be a:b with a and b in experiment.cv_warm_variants",
            )
        for v in (
            *self.cv_variants,
            *self.cv_warm_variants,
            *self.cv_scratch_variants,
            *self.variants,
            *self.lodo_variants,
            *self.rq3_variants,
            *self.mixed_variants,
            self.ablation_variant,
        ):
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
        _check(self.mixture_k >= 1, "experiment.mixture_k must be >= 1")
        _check(self.mixture_temperature > 0, "experiment.mixture_temperature must be > 0")
        _check(
            self.multitask_step_factor >= 1,
            "experiment.multitask_step_factor must be >= 1 (the zoo's K checkpoints fit)",
        )
        _check(self.long_steps >= 0, "experiment.long_steps must be >= 0")
        _check(all(0 <= a <= 1 for a in self.interpolations), "experiment.interpolations must be in [0, 1]")
        _check(all(p in (1, 5, 20) for p in self.probe_sizes), "experiment.probe_sizes must be 1, 5 or 20")
