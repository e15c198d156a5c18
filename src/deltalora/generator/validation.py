"""Choosing a generator's checkpoint on held-out prompts: validation-split draws of every training task.

A generator is trained on draws of each task's train prompts; it is validated on draws of the task's validation
split, which it never sees, against the task's mean checkpoint (the best a weight loss can reach from one
prompt set of the task: every checkpoint of the task is a target of the same prompts). This selects on
generalisation to new prompts of the training tasks; it never reads a test item or a held-out task.
"""

from __future__ import annotations

import math

import torch

from deltalora.config import GeneratorConfig
from deltalora.data.items import stable_seed
from deltalora.generator.loss import draw


class Validation:
    """Fixed validation draws (``generator.val_draws`` per training task) and the loss of a generator on them."""

    def __init__(
        self,
        val_emb: list[torch.Tensor],
        tokens: torch.Tensor,
        ckpt_task: torch.Tensor,
        mask: torch.Tensor,
        cfg: GeneratorConfig,
    ):
        g = torch.Generator().manual_seed(stable_seed("validation", cfg.seed) % 2**63)
        self.emb = [torch.stack([draw(e, cfg.n_prompts, g) for _ in range(cfg.val_draws)]) for e in val_emb]
        self.targets = torch.stack([tokens[(ckpt_task == t).to(tokens.device)].mean(0) for t in range(len(val_emb))])
        self.mask = mask
        self.best: dict = {}
        """The weights of the lowest validation loss so far: ``state``, ``loss``, ``step`` (empty before the first)."""

    def update(self, model: torch.nn.Module, step: int) -> float:
        """Validate the model after ``step`` and keep a copy of its weights if they are the best so far."""
        loss = self.loss(model)
        if loss < self.best.get("loss", math.inf):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.best.update(state=state, loss=loss, step=step)
        return loss

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float:
        """Masked token MSE of the generated adapters to their task's mean checkpoint, averaged over draws and
        tasks."""
        was_training = model.training
        model.eval()
        try:
            err = torch.stack(
                [((model(e) - t) ** 2 * self.mask).sum((1, 2)).mean() for e, t in zip(self.emb, self.targets)]
            )
        finally:
            model.train(was_training)
        return (err.mean() / self.mask.sum()).item()
