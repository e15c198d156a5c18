"""The generator's output heads: DnD's decoder, and a basis of the training targets' principal directions."""

from __future__ import annotations

import pytest
import torch

from deltalora.config import GeneratorConfig
from deltalora.data.tasks import load_task, resolve_spec
from deltalora.delta.compute import delta_stage
from deltalora.errors import ConfigError
from deltalora.generator.artifact import load_generator
from deltalora.generator.basis import HEADS, BasisHead
from deltalora.generator.dataset import training_set
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.train import train_generator
from deltalora.presets import apply_overrides


def test_head_table_and_validation():
    assert list(HEADS) == ["conv", "basis", "basis+conv"] and GeneratorConfig().head == "conv"
    with pytest.raises(ConfigError, match="generator.head"):
        GeneratorConfig(head="mlp")


def test_basis_head_starts_at_the_mean_and_spans_the_targets():
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(5, 6, 4, generator=g)
    head = BasisHead(d_cond=3, rank=8, n_tokens=6, width=4)
    head.fit(targets)
    out = head(torch.randn(2, 3, generator=g))
    torch.testing.assert_close(out, targets.mean(0).expand(2, 6, 4))  # zero coefficients at init
    assert head.directions[4:].abs().sum() == 0  # 5 targets span 4 directions; the rest stay zero
    # with the right coefficients the head reproduces a training target exactly
    centred = (targets - targets.mean(0)).flatten(1)
    coef = torch.linalg.lstsq(head.directions[:4].flatten(1).T.double(), centred[1].double()).solution
    torch.testing.assert_close(
        targets.mean(0) + torch.einsum("k,ktw->tw", coef.float(), head.directions[:4]), targets[1]
    )


def test_basis_head_reads_a_conditions_direction_not_its_length():
    """Its LayerNorm input: B's G_θ decodes c·δ as δ for any c > 0, so G(δa + δb) and G(½δa + ½δb) are one adapter."""
    g = torch.Generator().manual_seed(0)
    head = BasisHead(d_cond=16, rank=4, n_tokens=6, width=4)
    head.fit(torch.randn(5, 6, 4, generator=g))
    torch.nn.init.normal_(head.net[-1].weight, generator=g)  # trained coefficients, not the zero init
    d = torch.randn(1, 16, generator=g)
    torch.testing.assert_close(head(0.5 * d), head(d), rtol=1e-3, atol=1e-3)  # up to the LayerNorm's ε
    assert not torch.allclose(head(-d), head(d))


@pytest.mark.parametrize("head", ["basis", "basis+conv"])
def test_a_basis_generator_learns_to_tell_tasks_apart(head, tiny_zoo, tmp_path):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    preset = apply_overrides(
        tiny_zoo.preset,
        [f"generator.head={head}", "generator.steps=80", "generator.lr=1e-2", "generator.save_every=80"],
    )
    tasks = list(preset.pool)
    card = train_generator(preset, tiny_zoo.ws, tmp_path / "g", tasks, progress=False)
    assert card.steps_done == 80
    gen = load_generator(tmp_path / "g")
    enc = PromptEncoder(tiny_zoo.ws.prompt_cache)
    data, _ = training_set(preset, tiny_zoo.ws, tasks, None, enc, save_cache=False)
    n = preset.generator.n_prompts
    with torch.no_grad():
        outs = [
            gen.model(enc.encode([it.prompt for it in load_task(resolve_spec(t), preset.tasks).train[:n]])[None])[0]
            for t in tasks
        ]
    means = [data.tokens[data.ckpt_task == i].mean(0) for i in range(len(tasks))]
    # each task's prompts give tokens nearer its own targets than any other task's: the output depends on them
    for i, out in enumerate(outs):
        dist = [((out - m) ** 2).sum().item() for m in means]
        assert min(range(len(tasks)), key=dist.__getitem__) == i, (tasks[i], dist)
    # the saved generator reproduces the trained one's buffers exactly
    again = load_generator(tmp_path / "g")
    torch.testing.assert_close(again.model.basis.directions, gen.model.basis.directions, rtol=0, atol=0)
