"""The generator stage's config (``Preset.generator``)."""

from __future__ import annotations

from dataclasses import dataclass

from deltalora.errors import require as _check
from deltalora.generator.basis import HEADS
from deltalora.generator.variants import VARIANTS


@dataclass(frozen=True)
class GeneratorConfig:
    """How a prompt-to-LoRA generator is built and trained (the variants: ``deltalora.generator.variants``)."""

    variant: str = "dnd"
    """A name in the variant table: dnd (weight MSE), A1 (+ δ-head), A2 (+ exact δ), B (prompts -> δ -> LoRA),
    C (δ + KL first), E2E (completion loss through the base model), E2E+delta (+ exact δ)."""
    n_prompts: int = 32
    """N prompts per condition batch, drawn fresh from a task's train split every step."""
    head: str = "conv"
    """How tokens are formed (``deltalora.generator.basis.HEADS``): conv (DnD's decoder), basis (the mean target
    plus prompt-dependent coefficients on its principal directions), basis+conv (both, summed)."""
    basis_rank: int = 32
    """Principal directions of the training targets kept by a basis head."""
    channels: tuple[int, ...] = (64, 256)
    """Hidden channel counts of the hyper-convolutional decoder (between N and the T tokens)."""
    steps: int = 300
    """Optimizer steps (for B: of stage 2, the decoder G_θ)."""
    stage1_steps: int = 300
    """Steps of a variant's first stage, before the generator trains: B's E_ψ (prompts -> δ), A1's δ-head H."""
    batch_size: int = 4
    """(prompt batch, checkpoint) samples per step."""
    lr: float = 1e-3
    """AdamW peak learning rate (cosine schedule after warm-up)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    lambda_w: float = 1.0
    """Weight of the token MSE (the only loss of dnd; C's is ``lambda_reg``)."""
    lambda_delta: float = 1.0
    """Weight of the δ loss (A1: predicted by H, A2 and C: exact)."""
    head_pairs: int = 4
    """Variant A1: perturbed adapters per training checkpoint (Gaussian noise, and mixtures with another task's
    checkpoint) whose exact δ, measured once before training, fits the δ-head beside the references: the head
    then sees adapters off the zoo, like the generator's outputs, rather than ~one per task."""
    lambda_cons: float = 0.1
    """Variant B: weight of the exact-δ consistency term of G_θ."""
    lambda_reg: float = 0.1
    """Variant C: weight of its token MSE, a regulariser only (behaviour first: exact δ and KL dominate)."""
    lambda_kl: float = 1.0
    """Variant C: weight of KL(base+generated || base+reference) averaged over the gold-answer tokens."""
    kl_prompts: int = 4
    """Variant C: the task's first this many train items carry the KL term (fixed, so each reference
    checkpoint's distributions are computed once)."""
    lambda_sft: float = 1.0
    """End-to-end variants: weight of the completion loss of base + generated LoRA on the task's train items."""
    sft_items: int = 4
    """End-to-end variants: train items per sample for the completion loss."""
    init_from: str = ""
    """A trained generator folder (same head and training tasks) whose weights start this one: a warm start from
    a converged dnd; "" starts from the seeded initialisation."""
    checkpoints_per_run: int = 0
    """Weight targets per zoo run: its last this many checkpoints (0 = all). The MSE optimum for a task is the mean
    of its targets, so early checkpoints spread over training pull it toward a half-trained adapter; 1 keeps the
    final adapters (the oracle's), with any variation coming from seeds and data parts."""
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
    corrupt_delta: bool = True
    """RQ3: ``weight_noise`` and ``mislabel_fraction`` corrupt the δ targets with the weights (re-measured on the
    noisy adapters, taken from the same other task); False keeps each checkpoint's true δ, so δ carries what the
    corrupted weights lost."""
    save_every: int = 50
    """Steps between resumable training checkpoints."""
    val_every: int = 0
    """Steps between validations (0 = none): token MSE of adapters generated from draws of each training task's
    validation-split prompts (never trained on) to the task's mean checkpoint (``generator.validation``); the
    generator saved is the one with the lowest. Needs ``tasks.n_val`` > 0."""
    val_draws: int = 2
    """Validation prompt draws per training task."""
    seed: int = 0
    """Seed of initialisation, sampling and noise."""

    def __post_init__(self) -> None:
        _check(
            self.variant in VARIANTS, f"generator.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
        )
        _check(1 <= self.n_prompts <= 512, "generator.n_prompts must be in [1, 512]")
        _check(self.head in HEADS, f"generator.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        _check(self.basis_rank >= 1, "generator.basis_rank must be >= 1")
        _check(all(c >= 1 for c in self.channels), "generator.channels must be positive")
        _check(self.steps >= 1 and self.stage1_steps >= 0, "generator.steps must be >= 1 and stage1_steps >= 0")
        _check(self.batch_size >= 1, "generator.batch_size must be >= 1")
        _check(self.lr > 0 and self.weight_decay >= 0, "generator.lr must be > 0 and weight_decay >= 0")
        _check(
            min(self.lambda_w, self.lambda_delta, self.lambda_cons, self.lambda_reg, self.lambda_kl, self.lambda_sft)
            >= 0,
            "generator loss weights must be >= 0",
        )
        _check(self.head_pairs >= 0, "generator.head_pairs must be >= 0")
        _check(self.n_probes in (1, 5, 20), "generator.n_probes must be 1, 5 or 20")
        _check(self.kl_prompts >= 1 and self.sft_items >= 1, "generator.kl_prompts and sft_items must be >= 1")
        _check(self.checkpoints_per_run >= 0, "generator.checkpoints_per_run must be >= 0 (0 = all)")
        _check(0 <= self.exact_samples <= self.batch_size, "generator.exact_samples must be in [0, batch_size]")
        _check(self.cond_noise >= 0 and self.target_noise >= 0, "generator noise levels must be >= 0")
        _check(self.save_every >= 1, "generator.save_every must be >= 1")
        _check(self.val_every >= 0 and self.val_draws >= 1, "generator.val_every must be >= 0 and val_draws >= 1")
        _check(0 < self.data_fraction <= 1, "generator.data_fraction must be in (0, 1]")
        _check(self.weight_noise >= 0, "generator.weight_noise must be >= 0")
        _check(0 <= self.mislabel_fraction < 1, "generator.mislabel_fraction must be in [0, 1)")
