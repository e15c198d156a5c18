"""Devices on a CPU-only machine: every tensor of a generator step and of a δ batch is made on the requested device
(the ``meta`` device, which holds no data and refuses to mix with CPU tensors as CUDA does), ``--device`` /
``--dtype`` parsing and errors, LOCAL_RANK GPUs under a launcher, and device-independent resuming."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from typer.testing import CliRunner

from deltalora.cli import app, main
from deltalora.config import DeltaConfig, RuntimeConfig
from deltalora.data.registry import FAMILY_CANDIDATES
from deltalora.delta.compute import delta_stage
from deltalora.delta.probes import DeltaProbe
from deltalora.device import resolve_device, runtime
from deltalora.distributed import init_distributed
from deltalora.errors import ConfigError, UsageError
from deltalora.experiments.cv import declared_comparisons
from deltalora.generator.artifact import GeneratorCard
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.loss import draw_batch
from deltalora.generator.train import _setup, lr_lambda, train_step
from deltalora.generator.variants import VARIANTS
from deltalora.lm.models import load_base
from deltalora.presets import apply_overrides, get_preset
from deltalora.zoo.build import _check_same_preset

META = torch.device("meta")
# random draws come from seeded CPU generators on purpose (the same samples on every device) and are then moved
RNG_OPS = {"randn", "normal", "normal_", "rand", "uniform_", "randint", "randperm", "bernoulli_"}

ROOT = Path(__file__).resolve().parents[1]


class DeviceSpy(TorchDispatchMode):
    """Records every op that computes a floating-point tensor (not a CPU scalar) off the expected device."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.stray = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in RNG_OPS:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device != self.device and t.is_floating_point() and t.dim() > 0:
                    self.stray.append(f"{func} -> {t.device} {tuple(t.shape)}")
        return out


@pytest.fixture
def meta_attention(monkeypatch):
    """transformers skips the causal mask after asking whether the padding mask is all ones, a question a tensor
    without data cannot answer; building the mask is always correct, so the meta device builds it."""
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "_ignore_causal_mask_sdpa", lambda *a, **k: False)


@pytest.fixture(scope="module")
def ws(tiny_zoo):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    return tiny_zoo


def test_the_spy_sees_a_tensor_computed_off_the_device():
    with DeviceSpy(META) as spy:
        torch.ones(3, device=META) * 2
        torch.randn(4, generator=torch.Generator().manual_seed(0))  # a seeded CPU draw: allowed
        torch.ones(2) + 1  # computed on the CPU: recorded
    assert len(spy.stray) == 2 and all("cpu" in s for s in spy.stray), spy.stray


def test_one_delta_batch_on_the_requested_device(meta_attention):
    base, tok = load_base("tiny", META)
    probe = DeltaProbe(tok, DeltaConfig(n_probes=5, batch_size=5))
    with DeviceSpy(META) as spy:
        mean = probe.set_base(base)
        delta = probe.delta(base)
    assert mean.device == META and delta.device == META and delta.shape == (base.config.hidden_size,)
    assert not spy.stray, spy.stray


# the linearised variant needs the basis head, whose fit (an eigendecomposition) has no meta kernel
@pytest.mark.parametrize("variant", [v for v, spec in VARIANTS.items() if not spec.linear])
def test_one_generator_step_of_every_variant_on_the_requested_device(ws, variant, meta_attention):
    preset = apply_overrides(ws.preset, [f"generator.variant={variant}", "generator.batch_size=2"])
    cfg = preset.generator
    torch.manual_seed(0)
    data, tokenizer, model, loss_fn = _setup(preset, ws.ws, list(preset.pool), None, PromptEncoder(), 1, False, META)
    assert all(p.device == META for p in model.parameters())
    assert data.tokens.device == META and data.deltas.device == META and tokenizer.mean.device == META
    assert (loss_fn.ctx[2] is not None) == VARIANTS[variant].needs_base
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, (2,)))
    idx, seeds = draw_batch(torch.Generator().manual_seed(1), len(data.paths), cfg.batch_size)
    stages = (1, 2) if VARIANTS[variant].stage1 else (2,)
    with DeviceSpy(META) as spy:
        for stage in stages:
            loss, terms = train_step(loss_fn, model, opt, sched, idx, seeds, torch.arange(2), stage)
            assert loss.device == META and all(t.device == META for t in terms.values())
    assert not spy.stray, spy.stray
    assert all(p.grad is None or p.grad.device == META for p in model.parameters())


# ---------------------------------------------------------------- --device and --dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "tpu"}, r"--device \(runtime.device\) must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"device": "cuda:x"}, "must be auto, cpu, cuda or cuda:N"),
        ({"dtype": "fp16"}, r"--dtype \(runtime.dtype\) must be fp32 or bf16"),
    ],
)
def test_bad_runtime_values_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RuntimeConfig(**kwargs)


def test_cuda_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {spec}: no CUDA device on this machine"):
            resolve_device(spec)
    with pytest.raises(ConfigError, match="--dtype bf16 needs a CUDA device"):
        runtime(RuntimeConfig(dtype="bf16"))


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that claims two CUDA devices (set_device recorded, not called)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_each_rank_takes_its_local_rank_gpu(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1) and resolve_device("auto") == torch.device("cuda", 1)
    assert two_gpus == [0, 1, 1, 1]
    with pytest.raises(UsageError, match="each rank takes its LOCAL_RANK GPU"):
        resolve_device("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device, backend", [(torch.device("cuda", 0), "nccl"), (torch.device("cpu"), "gloo")])
def test_the_process_group_backend_follows_the_device(monkeypatch, device, backend):
    used = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", used.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert init_distributed(device).rank == 1 and used == [backend]


@pytest.mark.parametrize(
    "args",
    [
        ["zoo", "build", "--device", "tpu"],
        ["train-generator", "--device", "cuda:x"],
        ["delta", "protocol", "--dtype", "fp16"],
        ["generate", "-g", "x", "--prompts", "p.txt", "--out", "o", "--device", "gpu"],
    ],
)
def test_cli_rejects_a_bad_device_before_any_work(tmp_path, args):
    result = CliRunner().invoke(app, [*args, "--preset", "tiny", "--workspace", str(tmp_path / "ws")])
    assert isinstance(result.exception, ConfigError), repr(result.exception)
    assert not (tmp_path / "ws").exists()


def test_cli_names_the_option_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["deltalora", "zoo", "build", "--preset", "tiny", "--device", "cuda"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --device cuda: no CUDA device") and "Traceback" not in err


def test_gpu_preset_is_the_full_grid_on_cuda():
    gpu, small = get_preset("gpu"), get_preset("small")
    assert gpu.runtime.device == "cuda" and gpu.pool == small.pool and gpu.zoo == small.zoo
    ex = gpu.experiment
    assert len(ex.seeds) >= 3 and ex.n_test >= 100 and ex.steps > small.experiment.steps
    assert all(len(getattr(ex, f)) >= len(getattr(small.experiment, f)) for f in ("fractions", "weight_noise"))


def test_families_gpu_preset_is_the_cross_validation_the_cpu_cannot_give():
    gpu, fam = get_preset("families-gpu"), get_preset("families")
    assert gpu.runtime.device == "cuda" and (gpu.pool, gpu.zoo, gpu.generator) == (fam.pool, fam.zoo, fam.generator)
    ex = gpu.experiment
    assert {"dnd", "E2E", "E2E+delta"} <= set(ex.cv_variants) and len(ex.seeds) >= 3
    assert set(ex.cv_lofo) <= {s.domain for s in FAMILY_CANDIDATES}
    declared = [f"{a} - {b}" for a, b in declared_comparisons(gpu)]
    assert "E2E+delta, held-out family - retrieval, held-out family" in declared and "B - dnd" in declared
    # the committed declaration is this preset's: changing the preset means a new declaration, before any cell
    committed = json.loads((ROOT / "results/experiments_families_gpu/declared.json").read_text())
    assert committed["declared_comparisons"] == declared


# ---------------------------------------------------------------- the device is speed only for a workspace


def test_a_zoo_resumes_on_another_device(tiny_zoo):
    _check_same_preset(tiny_zoo.ws, tiny_zoo.preset.replace(runtime=RuntimeConfig("auto", "bf16")))
    with pytest.raises(ConfigError):  # while a real difference is still refused
        _check_same_preset(tiny_zoo.ws, tiny_zoo.preset.replace(zoo=dataclasses.replace(tiny_zoo.preset.zoo, rank=3)))


def test_a_generator_run_resumes_on_another_device(tiny_preset):
    card = GeneratorCard(tiny_preset, ["syn.add"], "ws", 1, 2, 3, 4, {}, {}, 8)
    moved = dataclasses.replace(card, preset=tiny_preset.replace(runtime=RuntimeConfig("cuda:1", "bf16")))
    other = dataclasses.replace(card, preset=apply_overrides(tiny_preset, ["generator.lr=0.5"]))
    assert card.same_run(moved) and not card.same_run(other)
