"""Generator pieces on the tiny model: LoRA tokenizer, variants, generation, retrieval, errors."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

from deltalora.data.tasks import load_task, resolve_spec
from deltalora.delta.compute import delta_stage
from deltalora.errors import AdapterError, ConfigError, GeneratorError
from deltalora.generator import dataset as dataset_module
from deltalora.generator.artifact import load_generator
from deltalora.generator.dataset import shuffled_deltas, training_set
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import choose_prompts, generate, read_prompts
from deltalora.generator.linear_delta import LinearDelta
from deltalora.generator.lora_tokens import LoraTokenizer
from deltalora.generator.loss import ExactBehaviour, GeneratorLoss
from deltalora.generator.model import Generator
from deltalora.generator.retrieval import build_retrieval, retrieve
from deltalora.generator.train import lr_lambda, train_generator
from deltalora.generator.validation import Validation
from deltalora.generator.variants import VARIANTS
from deltalora.lm.models import load_base
from deltalora.presets import apply_overrides
from deltalora.workspace import Workspace
from deltalora.zoo.manifest import Manifest


@pytest.fixture(scope="module")
def ws(tiny_zoo):
    delta_stage(tiny_zoo.preset, tiny_zoo.ws, (5,))
    return tiny_zoo


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder()


def _preset(ws, **gen):
    return apply_overrides(ws.preset, [f"generator.{k}={v}" for k, v in gen.items()])


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ LoRA tokenizer


@st.composite
def lora_shapes(draw):
    r = draw(st.integers(1, 8))
    layers = draw(st.integers(1, 3))
    modules = draw(
        st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "up_proj"]), min_size=1, max_size=3, unique=True)
    )
    shapes = {}
    for i in range(layers):
        for m in modules:
            d_in, d_out = draw(st.integers(3, 70)), draw(st.integers(3, 70))
            pre = f"base_model.model.model.layers.{i}.self_attn.{m}"
            shapes[f"{pre}.lora_A.weight"] = (r, d_in)
            shapes[f"{pre}.lora_B.weight"] = (d_out, r)
    return shapes


@settings(max_examples=40, deadline=None)
@given(shapes=lora_shapes(), width=st.one_of(st.none(), st.integers(4, 48)), seed=st.integers(0, 2**16))
def test_tokenizer_round_trip_exact(shapes, width, seed):
    g = torch.Generator().manual_seed(seed)
    sds = [{k: torch.randn(s, generator=g) * 0.05 + i * 0.01 for k, s in shapes.items()} for i in range(3)]
    tok = LoraTokenizer(shapes, width).fit(sds)
    tokens = tok.encode(sds[0])
    assert tokens.shape == (tok.n_tokens, tok.width)
    back = tok.decode(tokens)
    assert set(back) == set(shapes)
    assert max((back[k] - sds[0][k]).abs().max().item() for k in shapes) <= 1e-6
    assert tok.n_params == sum(a * b for a, b in shapes.values())


def test_tokenizer_removes_a_shared_init_from_the_targets():
    """Adapters that share lora_A (the zoo's init) differ only in B: A normalises to zero, the zoo mean too."""
    g = torch.Generator().manual_seed(0)
    shared_a = torch.randn(2, 8, generator=g)
    sds = [{"a.lora_A.weight": shared_a.clone(), "a.lora_B.weight": torch.randn(8, 2, generator=g)} for _ in range(4)]
    tok = LoraTokenizer.from_state_dict(sds[0]).fit(sds)
    mean_sd = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}
    assert tok.encode(mean_sd).abs().max() < 1e-5
    assert int((tok.encode(sds[1]).abs() > 1e-6).sum()) == sds[1]["a.lora_B.weight"].numel()  # only B is a target
    assert torch.allclose(tok.decode(tok.encode(sds[1]))["a.lora_A.weight"], shared_a, atol=1e-6)


def test_tokenizer_derives_width_without_padding_waste():
    shapes = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (8, 576),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (576, 8),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (8, 576),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": (192, 8),
    }
    tok = LoraTokenizer(shapes)
    assert tok.width == 192 and tok.n_tokens * tok.width == tok.n_params


def test_tokenizer_rejects_other_layout():
    tok = LoraTokenizer({"a.lora_A.weight": (2, 8), "a.lora_B.weight": (8, 2)})
    with pytest.raises(AdapterError, match="wrong shape"):
        tok.encode({"a.lora_A.weight": torch.zeros(3, 8), "a.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(AdapterError, match="missing"):
        tok.encode({"a.lora_A.weight": torch.zeros(2, 8)})


# ------------------------------------------------------------------ training, every variant


@pytest.mark.parametrize("variant", ["dnd", "A1", "A2", "A2-lin", "B", "C", "E2E", "E2E+delta"])
def test_variant_trains_and_loss_goes_down(ws, tmp_path, variant):
    # per-element normalisation starts every target at the zoo mean (loss ~1), so give it room to fit
    head = {"head": "basis"} if variant == "A2-lin" else {}
    preset = _preset(ws, variant=variant, steps=60, stage1_steps=24, lr=1e-2, warmup_steps=2, **head)
    out = tmp_path / variant
    res = train_generator(preset, ws.ws, out, list(preset.pool), progress=False)
    assert res.n_params > 0 and res.lora_params > 0
    log = _log(out)
    stages = [log[:24], log[24:]] if VARIANTS[variant].stage1 else [log]
    for rows in stages:
        first = sum(r["loss"] for r in rows[:8]) / 8
        last = sum(r["loss"] for r in rows[-8:]) / 8
        assert last < first, f"{variant}: loss {first:.4f} -> {last:.4f}"
    gen = load_generator(out)
    assert gen.card.preset.generator.variant == variant and gen.delta_scale > 0
    # the first order is checked against the exact δ of the kept generator's adapters
    assert (gen.card.linear_check is not None) == (variant == "A2-lin")
    if gen.card.linear_check:
        assert 0 <= gen.card.linear_check["rel_err"] and -1 <= gen.card.linear_check["cos"] <= 1


def test_a2_delta_gradient_reaches_decoder(ws, encoder):
    preset = _preset(ws, variant="A2", lambda_w=0.0)
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder)
    model = Generator(preset.generator, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    exact = ExactBehaviour(preset, data.adapter_config, 5)
    loss_fn = GeneratorLoss(model, data, tokenizer, exact, preset.generator)
    losses = loss_fn(torch.tensor([0, 3]), torch.tensor([5, 6]), torch.tensor([0, 1]), stage=2)
    assert "delta_exact" in losses
    losses["delta_exact"].backward()
    grads = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_a1_head_learns_from_measured_pairs_only_and_the_generator_from_the_head(ws, encoder):
    preset = _preset(ws, variant="A1", head_pairs=2)
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder, save_cache=False)
    assert data.head_tokens.shape == (2 * len(data.tokens), *data.tokens.shape[1:])
    # each perturbed adapter's δ is its own, measured: none equals a reference's
    assert all(min((data.deltas - d).norm(dim=1)) > 0 for d in data.head_deltas)
    model = Generator(preset.generator, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    loss_fn = GeneratorLoss(model, data, tokenizer, None, preset.generator)
    losses = loss_fn(torch.tensor([0, 3]), torch.tensor([5, 6]), torch.tensor([0, 1]), stage=2)
    losses["delta_head"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.head.parameters())  # stop-gradient into H
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    model.zero_grad(set_to_none=True)
    losses["head_fit"].backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())  # H's fit never moves the generator


@pytest.mark.parametrize(("variant", "first"), [("A1", "head"), ("B", "e_psi")])
def test_a_first_stage_trains_its_module_alone_and_b_decodes_true_delta_after(ws, encoder, variant, first):
    preset = _preset(ws, variant=variant, head_pairs=1)
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder, save_cache=False)
    model = Generator(preset.generator, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    exact = ExactBehaviour(preset, data.adapter_config, 5) if VARIANTS[variant].needs_base else None
    loss_fn = GeneratorLoss(model, data, tokenizer, exact, preset.generator)
    batch = (torch.tensor([0, 3]), torch.tensor([5, 6]), torch.tensor([0, 1]))
    sum(loss_fn(*batch, stage=1).values()).backward()
    moved = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {first}  # the generator stays where it started (a warm start keeps its optimum)
    if variant == "B":  # G_θ then learns from the true δ: E_ψ's stage-1 fit is not pulled by the decoder's losses
        model.zero_grad(set_to_none=True)
        sum(loss_fn(*batch, stage=2).values()).backward()
        assert all(p.grad is None for p in model.e_psi.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_perturbations_share_one_base_model(ws, encoder, monkeypatch):
    built = []
    real = dataset_module.ExactBehaviour
    monkeypatch.setattr(dataset_module, "ExactBehaviour", lambda *a, **k: built.append(1) or real(*a, **k))
    preset = _preset(ws, variant="A1", head_pairs=2, weight_noise=0.1)
    data, _ = training_set(preset, ws.ws, list(preset.pool), None, encoder, save_cache=False)
    assert data.head_tokens is not None and len(built) == 1  # noisy targets and A1's pairs: one load


def test_each_stage_gets_its_own_warmup_and_cosine():
    f = lr_lambda(2, (4, 10))
    stage1, stage2 = [f(s) for s in range(4)], [f(s) for s in range(4, 14)]
    assert stage1[:2] == [0.5, 1.0] and stage2[:2] == [0.5, 1.0]  # G_θ starts at the peak rate again
    assert stage2[2] == 1.0 and stage2[-1] < 0.05 and stage2 == [lr_lambda(2, (10,))(s) for s in range(10)]


def test_linearised_delta_is_exact_at_the_checkpoints_first_order_near_them_and_cached(
    ws, encoder, tmp_path, monkeypatch
):
    preset = _preset(ws, variant="A2-lin", head="basis")
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder, save_cache=False)
    model = Generator(preset.generator, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    model.basis.fit(data.tokens)
    exact = ExactBehaviour(preset, data.adapter_config, 5)
    lin = LinearDelta(model.basis, data.tokens, tokenizer, exact, data.delta_scale, tmp_path / "cache")
    k = len(lin.dirs)
    assert lin.jac.shape == (len(data.tokens), data.deltas.shape[1], k)
    used = lin.dirs.flatten(1).norm(dim=1) > 0
    assert 0 < used.sum() < len(data.tokens) and not lin.jac[:, :, ~used].any()  # unused directions move nothing

    def exact_delta(c, i):
        tokens = lin.mean + torch.einsum("k,ktw->tw", c, lin.dirs)
        return exact.delta({n: v[0] for n, v in tokenizer.decode(tokens[None]).items()}) / data.delta_scale, tokens

    i = torch.tensor([1])
    for size in (0.5, 0.25):
        c = lin.c_star[1] + size * used.float() / used.sum() ** 0.5
        true, tokens = exact_delta(c, 1)
        moved = (true - lin.d_star[1]).norm()
        err = (lin(tokens[None], i)[0] - true).norm()
        assert err < 0.2 * moved, (size, err, moved)  # first order: most of the change is predicted
    # δ* is the δ of the checkpoint's projection, which the tokens of that projection reproduce exactly
    true, tokens = exact_delta(lin.c_star[1], 1)
    assert torch.allclose(lin(tokens[None], i)[0], true, atol=1e-5)
    # cached: a second build measures nothing
    exact.delta = lambda *a: pytest.fail("measured again")
    again = LinearDelta(model.basis, data.tokens, tokenizer, exact, data.delta_scale, tmp_path / "cache")
    assert torch.equal(again.jac, lin.jac) and torch.equal(again.d_star, lin.d_star)
    # two processes (here threads) building the same Jacobians at once: one measures, the other waits and loads
    calls = []

    def measure(self):
        calls.append(1)
        time.sleep(0.3)
        return lin.d_star, lin.jac

    monkeypatch.setattr(LinearDelta, "_measure", measure)
    built = []

    def make() -> None:
        built.append(LinearDelta(model.basis, data.tokens, tokenizer, exact, 1.0, tmp_path / "shared"))

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(torch.equal(b.jac, lin.jac) for b in built) and len(built) == 2


def test_checkpoints_per_run_keeps_each_runs_last_checkpoints(ws, encoder):
    every, _ = training_set(_preset(ws), ws.ws, list(ws.preset.pool), None, encoder, save_cache=False)
    last, _ = training_set(_preset(ws, checkpoints_per_run=1), ws.ws, list(ws.preset.pool), None, encoder, False)
    finals = {c.path for c in Manifest.from_file(ws.ws.manifest).finals()}
    assert len(every.paths) > len(last.paths) and set(last.paths) == finals & set(every.paths)
    assert sorted(last.ckpt_task.tolist()) == list(range(len(last.tasks)))  # one final per task (one seed)


def _reference_in_peft(ws, encoder, variant: str):
    """The variant's training set and exact behaviour, three train items of the first checkpoint's task, and that
    checkpoint loaded in PEFT on a fresh base (with its tokenizer)."""
    preset = _preset(ws, variant=variant)
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder)
    exact = ExactBehaviour(preset, data.adapter_config, 5)
    items = data.items[int(data.ckpt_task[0])][:3]
    base, tok = load_base("tiny")
    peft = PeftModel.from_pretrained(base, str(ws.ws.zoo / data.paths[0])).eval()
    return preset, data, tokenizer, exact, items, peft, tok


def test_completion_loss_of_a_reference_equals_the_zoo_trainers(ws, encoder):
    """The end-to-end term's loss for a reference adapter's tokens is the zoo's training loss of that adapter
    loaded in PEFT, on the same items."""
    from deltalora.zoo.training import completion_loss

    preset, data, tokenizer, exact, items, peft, tok = _reference_in_peft(ws, encoder, "E2E")
    with torch.no_grad():
        ours = exact.completion_loss(tokenizer.decode(data.tokens[0]), items)
        theirs = completion_loss(peft, tok, items, preset.zoo.max_length, micro_batch=8)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)


def test_kl_term_reads_answer_tokens_like_the_scorer_and_is_zero_at_the_reference(ws, encoder):
    """C's differentiable answer-token distributions of a reference's tensors equal the scorer's of that adapter
    loaded in PEFT; the KL of the reference to itself is 0 and its distributions are computed once."""
    from deltalora.generator.variants import Step, _answer_kl
    from deltalora.lm.evaluate import answer_token_logprobs

    preset, data, tokenizer, exact, items, peft, tok = _reference_in_peft(ws, encoder, "C")
    with torch.no_grad():
        ours = exact.answer_logprobs(tokenizer.decode(data.tokens[0]), items)
        theirs = answer_token_logprobs(peft, tok, items, preset.zoo.max_length)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)

    model = Generator(preset.generator, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    idx = torch.tensor([0, 0])  # the reference's own tokens as the prediction, twice: KL 0, one cached reference
    gens, mask = [torch.Generator()] * 2, tokenizer.valid_mask()
    st = Step(
        model, data, tokenizer, exact, preset.generator, idx, gens, None, None, None, mask, [0, 1], data.tokens[idx]
    )
    assert _answer_kl(st).abs().max().item() < 1e-5 and list(exact._ref) == [0]


def test_e2e_gradient_reaches_the_generator_and_not_the_base(ws, encoder):
    preset = _preset(ws, variant="E2E", head="basis")
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder)
    model = Generator(preset.generator, tokenizer.n_tokens, tokenizer.width, data.deltas.shape[1])
    model.basis.fit(data.tokens)
    torch.nn.init.normal_(model.basis.net[-1].weight, std=0.1)  # zero-initialised: nothing flows to earlier layers
    exact = ExactBehaviour(preset, data.adapter_config, 5)
    loss_fn = GeneratorLoss(model, data, tokenizer, exact, preset.generator)
    losses = loss_fn(torch.tensor([0, 3]), torch.tensor([5, 6]), torch.tensor([0, 1]), stage=2)
    assert set(losses) == {"completion"}
    losses["completion"].backward()
    grads = [p.grad for p in model.basis.net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in exact.model.parameters())


def test_warm_start_copies_a_trained_generator_and_refuses_other_tasks(ws, tmp_path, encoder):
    from deltalora.generator.train import _setup

    src = tmp_path / "dnd"
    train_generator(_preset(ws, head="basis", steps=4), ws.ws, src, list(ws.preset.pool), progress=False)
    preset = _preset(ws, variant="E2E", head="basis", init_from=str(src))
    model = _setup(preset, ws.ws, list(preset.pool), None, encoder, 1, False)[2]
    want = load_generator(src).model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(GeneratorError, match="trained on other tasks"):
        _setup(preset, ws.ws, list(preset.pool)[:2], None, encoder, 1, False)
    with pytest.raises(GeneratorError, match="another architecture"):
        _setup(_preset(ws, variant="E2E", init_from=str(src)), ws.ws, list(preset.pool), None, encoder, 1, False)
    # A1 takes everything but its δ-head, which its first stage fits; B (G_θ reads δ, not prompts) is refused
    a1 = _setup(
        _preset(ws, variant="A1", head="basis", init_from=str(src)), ws.ws, list(preset.pool), None, encoder, 1, False
    )[2]
    assert all(torch.equal(v, want[k]) for k, v in a1.state_dict().items() if not k.startswith("head."))
    assert any(k.startswith("head.") for k in a1.state_dict())
    with pytest.raises(GeneratorError, match="another architecture"):
        _setup(
            _preset(ws, variant="B", head="basis", init_from=str(src)),
            ws.ws,
            list(preset.pool),
            None,
            encoder,
            1,
            False,
        )


def test_exact_delta_equals_plain_delta_of_reference(ws, encoder):
    """The training-time exact δ of a reference adapter's tokens equals the δ stored for it."""
    from deltalora.delta.compute import load_deltas

    preset = _preset(ws, variant="A2")
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder)
    exact = ExactBehaviour(preset, data.adapter_config, 5)
    with torch.no_grad():
        d = exact.delta(tokenizer.decode(data.tokens[0]))
    stored = load_deltas(ws.ws, 5)[data.paths[0]]
    assert torch.allclose(d, stored, atol=1e-5)


def test_b_decodes_arbitrary_delta(ws, tmp_path):
    preset = _preset(ws, variant="B", steps=4, stage1_steps=4)
    out = tmp_path / "B"
    train_generator(preset, ws.ws, out, list(preset.pool), progress=False)
    gen = load_generator(out)
    model, tokenizer = gen.model, gen.tokenizer
    arbitrary = torch.randn(2, gen.card.d_delta)  # no adapter produced these
    with torch.no_grad():
        tokens = model.from_delta(arbitrary)
    assert tokens.shape == (2, tokenizer.n_tokens, tokenizer.width) and torch.isfinite(tokens).all()
    tensors = tokenizer.decode(tokens[0])
    assert set(tensors) == set(gen.card.shapes)
    # message reworded with the variant table (was "only variant B decodes a δ; this generator is dnd")
    with pytest.raises(GeneratorError, match="variant dnd does not decode a δ; variants that do: B$"):
        Generator(preset.generator.__class__(variant="dnd", n_prompts=4, channels=(8,)), 4, 8, 3).from_delta(arbitrary)


def _killed_then_resumed(preset, ws, out, monkeypatch, kill_at: int):
    """Train, interrupted at the ``kill_at``-th loss evaluation, then train again in the same folder (a resume)."""
    real, calls = GeneratorLoss.forward, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(GeneratorLoss, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        train_generator(preset, ws.ws, out, list(preset.pool), progress=False)
    monkeypatch.setattr(GeneratorLoss, "forward", real)
    assert not (out / "generator.safetensors").exists()
    return train_generator(preset, ws.ws, out, list(preset.pool), progress=False)


def test_resume_after_interrupt_gives_identical_generator(ws, tmp_path, monkeypatch):
    preset = _preset(ws, variant="dnd", steps=8, save_every=4)
    full = tmp_path / "full"
    train_generator(preset, ws.ws, full, list(preset.pool), progress=False)

    cut = tmp_path / "cut"
    _killed_then_resumed(preset, ws, cut, monkeypatch, kill_at=6)
    a, b = load_generator(full).model.state_dict(), load_generator(cut).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _log(cut)] == list(range(1, 9))


def _val_preset(ws, **gen):
    return apply_overrides(_preset(ws, **gen), ["tasks.n_val=4"])


def test_validation_keeps_the_best_generator_and_resumes_with_it(ws, tmp_path, monkeypatch, encoder):
    """The saved generator is the validated step of lowest loss, not the last one (re-measured on the saved
    weights), and a run killed after a save resumes to the same generator, its best included."""
    preset = _val_preset(ws, variant="dnd", steps=8, save_every=4, val_every=2, lr=0.3)
    real_update = Validation.update

    def step_4_best(self, model, step):  # the loss keeps falling here: make step 4 the best, so restoring matters
        real_loss = self.loss
        self.loss = lambda m: real_loss(m) + (0.0 if step == 4 else 1.0)
        try:
            return real_update(self, model, step)
        finally:
            del self.loss

    monkeypatch.setattr(Validation, "update", step_4_best)
    full = tmp_path / "full"
    card = train_generator(preset, ws.ws, full, list(preset.pool), progress=False)
    vals = {r["step"]: r["val_loss"] for r in _log(full) if "val_loss" in r}
    assert sorted(vals) == [2, 4, 6, 8] and card.best_step == 4 and card.val_loss == vals[4]
    data, tokenizer = training_set(preset, ws.ws, list(preset.pool), None, encoder, save_cache=False)
    val = Validation(data.val_emb, data.tokens, data.ckpt_task, tokenizer.valid_mask(), preset.generator)
    assert val.loss(load_generator(full).model) == pytest.approx(vals[4], rel=1e-5)
    assert vals[8] - 1.0 != pytest.approx(vals[4], rel=1e-3)  # the last step's weights differ from the saved ones

    cut = tmp_path / "cut"
    resumed = _killed_then_resumed(preset, ws, cut, monkeypatch, kill_at=7)
    assert (resumed.best_step, resumed.val_loss) == (4, card.val_loss)
    a, b = load_generator(full).model.state_dict(), load_generator(cut).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_without_a_validation_split_is_refused(ws, tmp_path):
    with pytest.raises(GeneratorError, match=r"has none: set tasks.n_val > 0"):
        train_generator(_preset(ws, val_every=2), ws.ws, tmp_path / "g", list(ws.preset.pool), progress=False)


def test_resume_refuses_other_config(ws, tmp_path):
    out = tmp_path / "g"
    train_generator(_preset(ws, steps=4, save_every=2), ws.ws, out, list(ws.preset.pool), progress=False)
    with pytest.raises(GeneratorError, match="another config"):
        train_generator(_preset(ws, steps=4, save_every=2, lr=0.5), ws.ws, out, list(ws.preset.pool), progress=False)


# ------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def trained(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "dnd"
    train_generator(_preset(ws, steps=6), ws.ws, out, list(ws.preset.pool), progress=False)
    return out


def test_generated_adapter_loads_in_peft_and_changes_logits(ws, trained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"{i} plus {i} equals" for i in range(6)) + "\n")
    from typer.testing import CliRunner

    from deltalora.cli import app

    res = CliRunner().invoke(
        app, ["generate", "-g", str(trained), "--prompts", str(prompts), "--out", str(tmp_path / "ad")]
    )
    assert res.exit_code == 0, res.output
    prov = json.loads((tmp_path / "ad" / "provenance.json").read_text())
    assert prov["variant"] == "dnd" and prov["n_prompts_used"] == 4 and len(prov["prompts_sha256"]) == 64
    base, tok = load_base("tiny")
    ids = tok("3 plus 4 equals", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits.clone()
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
        after = peft_model(ids).logits
    assert not torch.allclose(before, after)


def test_same_seed_same_adapter(trained, tmp_path, encoder):
    prompts = [f"{i} plus 1 equals" for i in range(10)]
    generate(trained, prompts, tmp_path / "a", seed=3, encoder=encoder)
    generate(trained, prompts, tmp_path / "b", seed=3, encoder=encoder)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()


def test_too_few_prompts_sample_with_replacement_and_warn(caplog):
    with caplog.at_level(logging.WARNING):
        chosen = choose_prompts(["a", "b"], 5, seed=0)
    assert len(chosen) == 5 and set(chosen) <= {"a", "b"}
    assert "sampling with replacement" in caplog.text


def test_retrieval_returns_the_tasks_own_adapter(ws, tmp_path, encoder):
    index = build_retrieval(ws.preset, ws.ws, tmp_path / "ret", list(ws.preset.pool), encoder=encoder)
    for name in ws.preset.pool:
        task = load_task(resolve_spec(name), ws.preset.tasks)
        got, folder = retrieve(index, [it.prompt for it in task.train], encoder)
        assert got == name
        ref = ws.folder(name) / "adapter_model.safetensors"
        assert (folder / "adapter_model.safetensors").read_bytes() == ref.read_bytes()


def test_shuffle_delta_permutes_across_tasks():
    deltas = torch.arange(12, dtype=torch.float).reshape(6, 2)
    ckpt_task = torch.tensor([0, 0, 1, 1, 2, 2])
    shuffled = shuffled_deltas(deltas, ckpt_task, seed=1)
    for i in range(6):
        src = [j for j in range(6) if torch.equal(deltas[j], shuffled[i])]
        assert len(src) == 1 and ckpt_task[src[0]] != ckpt_task[i]


# ------------------------------------------------------------------ bad input


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(GeneratorError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(GeneratorError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(GeneratorError, match="line 2"):
        read_prompts(bad)
    good = tmp_path / "g.jsonl"
    good.write_text('"first"\n{"prompt": "second"}\n')
    assert read_prompts(good) == ["first", "second"]


def test_generator_for_other_lora_shape_is_refused(trained, tmp_path):
    copy = tmp_path / "g"
    shutil.copytree(trained, copy)
    cfg = json.loads((copy / "config.json").read_text())
    key = next(iter(cfg["shapes"]))
    cfg["shapes"][key] = [cfg["shapes"][key][0] + 1, cfg["shapes"][key][1]]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GeneratorError, match="generator.safetensors"):
        load_generator(copy)


def test_zoo_without_delta_is_refused(tiny_zoo, tmp_path):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_zoo.ws.zoo, ws.zoo)
    with pytest.raises(GeneratorError, match="delta compute"):
        train_generator(tiny_zoo.preset, ws, tmp_path / "out", list(tiny_zoo.preset.pool), progress=False)


def test_bad_variant_is_a_config_error(ws):
    with pytest.raises(ConfigError, match="variant"):
        _preset(ws, variant="Z")


# ------------------------------------------------------------------ assessment


def test_assess_scores_generated_and_reference_adapters_on_the_same_items(ws, trained, tmp_path, encoder):
    from deltalora.experiments.assess import assess_generator
    from deltalora.lm.evaluate import accuracy
    from deltalora.zoo.adapters import load_adapter

    index = build_retrieval(ws.preset, ws.ws, tmp_path / "ret", list(ws.preset.pool), encoder=encoder)
    res = assess_generator(ws.preset, ws.ws, index, ["syn.add", "syn.parity"], n_draws=2, n_test=8)
    for name in ("syn.add", "syn.parity"):
        row = res["tasks"][name]
        assert row["n_test"] == 8 and row["acc"]["n"] == 2
        # retrieval on a task's own prompts returns its reference adapter: same behaviour, same weights
        assert row["delta_cos"]["mean"] == pytest.approx(1.0, abs=1e-5) and row["param_mse"]["mean"] == 0.0
        assert row["acc"]["mean"] == row["reference_acc"]["mean"]
        base, tok = load_base("tiny")
        task = load_task(resolve_spec(name), ws.preset.tasks)
        ref = load_adapter(base, ws.folder(name), "tiny")
        assert row["reference_acc"]["mean"] == accuracy(ref, tok, task.test[:8])
    gen = assess_generator(ws.preset, ws.ws, trained, ["syn.add"], n_draws=2, n_test=8)
    assert 0.0 <= gen["overall"]["acc"]["mean"] <= 1.0 and gen["overall"]["param_mse"]["mean"] > 0
    assert set(gen["overall"]) >= {"acc", "reference_acc", "base_acc", "param_mse", "delta_dist", "delta_cos"}
