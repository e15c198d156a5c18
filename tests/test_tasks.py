"""Task sources (JSONL, BIG-bench JSON, synthetic), validation errors, splits, configs and overrides."""

from __future__ import annotations

import json
import random

import pytest

from conftest import exact_rows, mc_rows, write_jsonl
from deltalora.config import DeltaConfig, Preset, TaskConfig, ZooConfig
from deltalora.data.items import Item
from deltalora.data.jsonl import load_jsonl_items, load_user_specs
from deltalora.data.registry import BUILTIN, TaskSpec
from deltalora.data.tasks import load_task, resolve_spec, split_items
from deltalora.errors import ConfigError, SourceError, TaskError
from deltalora.presets import apply_overrides, get_preset

CFG = TaskConfig(max_test=10, max_train=100, min_items=8)


def jsonl_spec(path, name="user.task", domain="userdom") -> TaskSpec:
    return TaskSpec(name, domain, f"jsonl:{path}")


# ---------------------------------------------------------------- JSONL parsing


def test_jsonl_mc_items_parsed(jsonl_writer):
    f = jsonl_writer(
        "mc.jsonl",
        [
            {"prompt": "Q: 2+2?\nA:  ", "choices": ["3", "4"], "answer": "4"},
            "",  # blank lines are skipped
            {"prompt": "Q: 1+1?\nA:", "choices": ["2", "5", "7"], "answer": "2", "split": "test"},
        ],
    )
    items = load_jsonl_items(f)
    assert items == [
        (Item("Q: 2+2?\nA:", "4", ("3", "4")), None),  # trailing whitespace of the prompt is dropped
        (Item("Q: 1+1?\nA:", "2", ("2", "5", "7")), "test"),
    ]
    assert all(it.is_mc for it, _ in items)
    assert items[0][0].completion() == " 4"


def test_jsonl_exact_items_parsed(jsonl_writer):
    f = jsonl_writer(
        "ex.jsonl",
        [
            {"prompt": "Plural of cat:", "target": " cats "},
            {"prompt": "Plural of dog:", "target": "dogs", "split": "train"},
        ],
    )
    items = load_jsonl_items(f)
    assert items == [(Item("Plural of cat:", "cats"), None), (Item("Plural of dog:", "dogs"), "train")]
    assert not items[0][0].is_mc


GOOD_MC = {"prompt": "ok?", "choices": ["a", "b"], "answer": "a"}


@pytest.mark.parametrize(
    "bad_line, line_no, must_contain",
    [
        ('{"prompt": "x", "choices": ["a"', 2, ["not valid JSON"]),
        ('["not", "an", "object"]', 2, ["JSON object"]),
        (json.dumps({"choices": ["a", "b"], "answer": "a"}), 2, ["'prompt'"]),
        (json.dumps({"prompt": "   ", "choices": ["a", "b"], "answer": "a"}), 2, ["'prompt'"]),
        (json.dumps({"prompt": "p", "choices": ["a", "b"], "answer": "c"}), 2, ["'answer'", "'choices'"]),
        (json.dumps({"prompt": "p", "choices": ["a", "b"]}), 2, ["'answer'"]),
        (json.dumps({"prompt": "p", "choices": [], "answer": "a"}), 2, ["'choices'"]),
        (json.dumps({"prompt": "p", "choices": "ab", "answer": "a"}), 2, ["'choices'"]),
        (json.dumps({"prompt": "p", "choices": ["a", ""], "answer": "a"}), 2, ["'choices'"]),
        (json.dumps({"prompt": "p", "choices": ["a", "b", "a"], "answer": "a"}), 2, ["'choices'", "duplicates"]),
        (json.dumps({"prompt": "p"}), 2, ["'target'"]),
        (json.dumps({"prompt": "p", "target": ""}), 2, ["'target'"]),
        (json.dumps({"prompt": "p", "choices": ["a", "b"], "answer": "a", "split": "dev"}), 2, ["'split'", "'dev'"]),
    ],
)
def test_jsonl_bad_item_names_file_line_and_field(jsonl_writer, bad_line, line_no, must_contain):
    f = jsonl_writer("bad.jsonl", [GOOD_MC, bad_line, GOOD_MC])
    with pytest.raises(TaskError) as e:
        load_jsonl_items(f)
    msg = str(e.value)
    assert str(f) in msg
    assert f"line {line_no}" in msg
    for s in must_contain:
        assert s in msg


def test_jsonl_line_numbers_count_blank_lines(jsonl_writer):
    f = jsonl_writer("bad.jsonl", [GOOD_MC, "", "", json.dumps({"prompt": "p"})])
    with pytest.raises(TaskError, match=r"line 4: field 'target'"):
        load_jsonl_items(f)


def test_jsonl_mixing_mc_and_exact_is_rejected(jsonl_writer):
    f = jsonl_writer("mix.jsonl", [GOOD_MC, {"prompt": "p", "target": "t"}])
    with pytest.raises(TaskError) as e:
        load_jsonl_items(f)
    assert str(f) in str(e.value) and "mixes" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_jsonl_empty_file_is_rejected(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(TaskError) as e:
        load_jsonl_items(f)
    assert str(f) in str(e.value) and "no items" in str(e.value)


def test_jsonl_missing_file_is_a_task_error(tmp_path):
    f = tmp_path / "nope.jsonl"
    with pytest.raises(TaskError, match="cannot read task file") as e:
        load_task(jsonl_spec(f), CFG)
    assert str(f) in str(e.value)


def test_load_task_from_jsonl(jsonl_writer):
    f = jsonl_writer("t.jsonl", mc_rows(40))
    task = load_task(jsonl_spec(f), CFG)
    assert (task.name, task.domain, task.kind) == ("user.task", "userdom", "mc")
    assert len(task.test) == 10 and len(task.train) == 30
    ex = load_task(jsonl_spec(jsonl_writer("e.jsonl", exact_rows(20))), CFG)
    assert ex.kind == "exact" and len(ex.test) == 10 and len(ex.train) == 10


def test_load_task_deduplicates_prompts_and_enforces_min_items(jsonl_writer):
    rows = mc_rows(6) + mc_rows(6)  # 6 distinct prompts, each twice
    f = jsonl_writer("dup.jsonl", rows)
    with pytest.raises(TaskError) as e:
        load_task(jsonl_spec(f, name="dupes"), CFG)
    assert "dupes" in str(e.value) and "6 distinct items" in str(e.value) and "at least 8" in str(e.value)
    task = load_task(jsonl_spec(f), TaskConfig(min_items=4, max_test=3))
    prompts = [it.prompt for it in task.train + task.test]
    assert len(prompts) == len(set(prompts)) == 6


def test_unknown_source_kind(tmp_path):
    with pytest.raises(TaskError, match="must start with bigbench:, jsonl: or synthetic:"):
        load_task(TaskSpec("x", "d", "ftp:somewhere"), CFG)


# ---------------------------------------------------------------- user spec files


def test_load_user_specs_resolves_paths_relative_to_the_spec_file(tmp_path):
    write_jsonl(tmp_path / "data" / "items.jsonl", mc_rows(20))
    spec_file = tmp_path / "tasks.json"
    spec_file.write_text(json.dumps([{"name": "my.task", "domain": "mine", "path": "data/items.jsonl", "note": "hi"}]))
    (spec,) = load_user_specs(spec_file)
    assert spec == TaskSpec("my.task", "mine", f"jsonl:{(tmp_path / 'data' / 'items.jsonl').resolve()}", note="hi")
    assert resolve_spec("my.task", [spec]) is spec
    task = load_task(spec, CFG)
    assert task.domain == "mine" and len(task.train) + len(task.test) == 20


@pytest.mark.parametrize("missing", ["name", "domain", "path"])
def test_load_user_specs_missing_field(tmp_path, missing):
    entry = {"name": "a", "domain": "b", "path": "c.jsonl"}
    del entry[missing]
    spec_file = tmp_path / "tasks.json"
    spec_file.write_text(json.dumps([{"name": "ok", "domain": "d", "path": "x.jsonl"}, entry]))
    with pytest.raises(TaskError) as e:
        load_user_specs(spec_file)
    msg = str(e.value)
    assert str(spec_file) in msg and "entry 1" in msg and f"'{missing}'" in msg


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot read tasks file"),
        (json.dumps({"name": "a"}), "expected a JSON list"),
        (json.dumps(["just a string"]), "entry 0: field 'name'"),
    ],
)
def test_load_user_specs_malformed(tmp_path, content, match):
    spec_file = tmp_path / "tasks.json"
    spec_file.write_text(content)
    with pytest.raises(TaskError, match=match):
        load_user_specs(spec_file)


def test_load_user_specs_missing_file(tmp_path):
    with pytest.raises(TaskError, match="cannot read tasks file"):
        load_user_specs(tmp_path / "absent.json")


# ---------------------------------------------------------------- unknown names


def test_unknown_task_lists_known_names():
    with pytest.raises(TaskError) as e:
        resolve_spec("no.such.task")
    msg = str(e.value)
    assert "'no.such.task'" in msg
    for name in ("syn.add", "syn.copy", "arithmetic.2_digit_addition"):
        assert name in msg
    extra = [TaskSpec("mine.x", "d", "jsonl:/x")]
    with pytest.raises(TaskError, match="mine.x"):
        resolve_spec("nope", extra)


def test_builtin_resolves():
    assert resolve_spec("syn.add") is BUILTIN["syn.add"]


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        get_preset("huge")
    assert "'huge'" in str(e.value) and "small" in str(e.value) and "tiny" in str(e.value)


def test_unknown_model_lists_known_names():
    from deltalora.lm.models import load_base

    with pytest.raises(ConfigError) as e:
        load_base("nope")
    msg = str(e.value)
    assert "'nope'" in msg and "smollm2-135m" in msg and "tiny" in msg


def test_model_folder_without_config_is_rejected(tmp_path):
    from deltalora.lm.models import load_base

    with pytest.raises(SourceError, match="config.json"):
        load_base(str(tmp_path))


# ---------------------------------------------------------------- splits


def _prompts(items):
    return [it.prompt for it in items]


def test_split_is_deterministic_and_disjoint(jsonl_writer):
    spec = jsonl_spec(jsonl_writer("t.jsonl", mc_rows(60)))
    a, b = load_task(spec, CFG), load_task(spec, CFG)
    assert a == b
    assert not set(_prompts(a.train)) & set(_prompts(a.test))
    assert len(a.train) + len(a.test) == 60
    # the shuffle depends on the seed, not on the file order
    other = load_task(spec, TaskConfig(split_seed=1, max_test=10, max_train=100, min_items=8))
    assert set(_prompts(other.test)) != set(_prompts(a.test))
    assert set(_prompts(other.train + other.test)) == set(_prompts(a.train + a.test))
    # ...and on the task name
    renamed = load_task(jsonl_spec(spec.source.split(":", 1)[1], name="other.name"), CFG)
    assert set(_prompts(renamed.test)) != set(_prompts(a.test))


def test_split_caps(jsonl_writer):
    spec = jsonl_spec(jsonl_writer("t.jsonl", mc_rows(40)))
    t = load_task(spec, TaskConfig(max_test=100, max_test_fraction=0.25, max_train=7, min_items=8))
    assert len(t.test) == 10  # 25% of 40
    assert len(t.train) == 7


def test_pinned_split_items_are_honored(jsonl_writer):
    rows = mc_rows(40)
    for i in range(0, 6):
        rows[i]["split"] = "test"
    for i in range(6, 30):
        rows[i]["split"] = "train"
    spec = jsonl_spec(jsonl_writer("t.jsonl", rows))
    for seed in (0, 1, 2):
        t = load_task(spec, TaskConfig(split_seed=seed, max_test=10, max_train=100, min_items=8))
        test, train = set(_prompts(t.test)), set(_prompts(t.train))
        assert {r["prompt"].rstrip() for r in rows[:6]} <= test
        assert {r["prompt"].rstrip() for r in rows[6:30]} <= train
        assert not test & train
        assert len(t.test) == 10


def test_split_needs_both_sides():
    items = [(Item(f"p{i}", "a", ("a", "b")), "train") for i in range(10)]
    with pytest.raises(TaskError, match="need both"):
        split_items("all.train", items, CFG)


def test_synthetic_tasks_are_deterministic(tiny_preset):
    for name in tiny_preset.pool:
        a = load_task(resolve_spec(name), tiny_preset.tasks)
        b = load_task(resolve_spec(name), tiny_preset.tasks)
        assert a == b
        assert not set(_prompts(a.train)) & set(_prompts(a.test))
        assert all(it.answer in it.choices for it in a.train + a.test if it.is_mc)
    assert load_task(resolve_spec("syn.copy"), tiny_preset.tasks).kind == "exact"
    assert load_task(resolve_spec("syn.add"), tiny_preset.tasks).kind == "mc"


def test_unknown_synthetic_generator():
    with pytest.raises(TaskError, match="unknown synthetic generator"):
        load_task(TaskSpec("syn.x", "d", "synthetic:nope"), CFG)


# ---------------------------------------------------------------- BIG-bench JSON (fake, cached)


def _write_bigbench(cache, path, data):
    f = cache / "bigbench" / path / "task.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(data))
    return f


@pytest.fixture
def bb_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DELTALORA_CACHE", str(cache))
    # Any attempt to reach the package index would be a bug here: the task.json is cached.
    import deltalora.data.bigbench as bb

    monkeypatch.setattr(bb, "sdist_path", lambda: pytest.fail("BIG-bench sdist requested for a cached task"))
    return cache


def test_bigbench_multiple_choice(bb_cache):
    examples = []
    for i in range(12):
        choices = [f"opt{i}_{k}" for k in range(4)]
        examples.append({"input": f"question {i}?", "target_scores": {c: int(k == 0) for k, c in enumerate(choices)}})
    # several maximal scores: not a single-answer item, skipped
    examples.append({"input": "ambiguous?", "target_scores": {"x": 1, "y": 1, "z": 0}})
    _write_bigbench(bb_cache, "fake/mc_task", {"examples": examples, "task_prefix": "Answer it."})
    spec = TaskSpec("fake.mc_task", "fake", "bigbench:fake/mc_task")
    cfg = TaskConfig(max_test=4, min_items=4)
    task = load_task(spec, cfg)
    assert task.kind == "mc"
    items = {it.prompt: it for it in task.train + task.test}
    assert len(items) == 12
    assert not any("ambiguous" in p for p in items)
    orders_changed = 0
    for i in range(12):
        (it,) = [it for p, it in items.items() if f"question {i}?" in p]
        original = [f"opt{i}_{k}" for k in range(4)]
        assert it.answer == original[0]  # the answer survives the shuffle
        assert sorted(it.choices) == sorted(original)
        orders_changed += list(it.choices) != original
        # prompt: task prefix, input, the choices in their shuffled order, output prefix
        assert it.prompt == (
            "Answer it.\n\nQ: " + f"question {i}?" + "".join(f"\n  choice: {c}" for c in it.choices) + "\nA:"
        )
    assert orders_changed > 0  # BIG-bench lists the right answer first; positions are shuffled
    # deterministic: a second load gives the same choice order
    assert load_task(spec, cfg) == task


def test_bigbench_choices_shuffle_is_seeded_by_task_and_index(bb_cache):
    from deltalora.data.items import stable_seed

    examples = [{"input": f"q{i}", "target_scores": {"a": 0, "b": 1, "c": 0, "d": 0, "e": 0}} for i in range(8)]
    _write_bigbench(bb_cache, "fake/seeded", {"examples": examples, "append_choices_to_input": False})
    task = load_task(TaskSpec("fake.seeded", "fake", "bigbench:fake/seeded"), TaskConfig(max_test=3, min_items=4))
    for it in task.train + task.test:
        i = int(it.prompt.split("q")[1].split("\n")[0])
        expected = ["a", "b", "c", "d", "e"]
        random.Random(stable_seed("fake/seeded", i)).shuffle(expected)
        assert list(it.choices) == expected and it.answer == "b"
        assert "choice:" not in it.prompt


def test_bigbench_exact_match(bb_cache):
    examples = [{"input": f"plural of word{i}", "target": f"word{i}s"} for i in range(6)]
    examples += [{"input": f"past of verb{i}", "target": [f"verb{i}ed", "other"]} for i in range(4)]
    _write_bigbench(
        bb_cache,
        "fake/exact_task",
        {
            "examples": examples,
            "preferred_score": "exact_str_match",
            "example_input_prefix": "In: ",
            "example_output_prefix": "\nOut:",
        },
    )
    task = load_task(
        TaskSpec("fake.exact_task", "fake", "bigbench:fake/exact_task"), TaskConfig(max_test=3, min_items=4)
    )
    assert task.kind == "exact"
    items = {it.prompt: it for it in task.train + task.test}
    assert len(items) == 10
    assert items["In: plural of word3\nOut:"].answer == "word3s"
    assert items["In: past of verb2\nOut:"].answer == "verb2ed"  # a list target takes its first entry
    assert all(not it.choices for it in items.values())


def test_bigbench_kind_override_and_errors(bb_cache):
    examples = [{"input": f"q{i}", "target": "t"} for i in range(8)]
    f = _write_bigbench(bb_cache, "fake/no_scores", {"examples": examples})
    # preferred score defaults to multiple choice, which needs target_scores
    with pytest.raises(TaskError) as e:
        load_task(TaskSpec("fake.no_scores", "fake", "bigbench:fake/no_scores"), CFG)
    assert str(f) in str(e.value) and "example 0" in str(e.value) and "'target_scores'" in str(e.value)
    # ... but the spec may ask for exact match
    task = load_task(
        TaskSpec("fake.no_scores", "fake", "bigbench:fake/no_scores", kind="exact"), TaskConfig(max_test=3, min_items=4)
    )
    assert task.kind == "exact"

    f2 = _write_bigbench(
        bb_cache, "fake/bad_target", {"examples": [{"input": "q", "target": ""}], "preferred_score": "exact_str_match"}
    )
    with pytest.raises(TaskError, match="example 0: field 'target'") as e:
        load_task(TaskSpec("fake.bad_target", "fake", "bigbench:fake/bad_target"), CFG)
    assert str(f2) in str(e.value)
    _write_bigbench(bb_cache, "fake/no_input", {"examples": [{"target_scores": {"a": 1}}]})
    with pytest.raises(TaskError, match="example 0: field 'input'"):
        load_task(TaskSpec("fake.no_input", "fake", "bigbench:fake/no_input"), CFG)
    _write_bigbench(bb_cache, "fake/empty", {"examples": []})
    with pytest.raises(TaskError, match="'examples'"):
        load_task(TaskSpec("fake.empty", "fake", "bigbench:fake/empty"), CFG)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ZooConfig(rank=0), "zoo.rank"),
        (lambda: ZooConfig(alpha=0), "zoo.alpha"),
        (lambda: ZooConfig(target_modules=()), "zoo.target_modules"),
        (lambda: ZooConfig(steps=0), "zoo.steps"),
        (lambda: ZooConfig(lr=-1.0), "zoo.lr"),
        (lambda: ZooConfig(max_length=4), "zoo.max_length"),
        (lambda: ZooConfig(seeds=()), "zoo.seeds"),
        (lambda: ZooConfig(seeds=(0, 0)), "zoo.seeds"),
        (lambda: ZooConfig(steps=4, pair_steps=4, keep_last=5), "zoo.keep_last"),
        (lambda: ZooConfig(steps=10, pair_steps=10, keep_last=3, save_every=5), "zoo.keep_last"),
        (lambda: ZooConfig(eval_batch_size=0), "zoo.eval_batch_size"),
        (lambda: DeltaConfig(n_probes=3), "delta.n_probes"),
        (lambda: DeltaConfig(batch_size=0), "delta.batch_size"),
        (lambda: TaskConfig(max_test=0), "tasks.max_test"),
        (lambda: TaskConfig(max_test_fraction=1.0), "tasks.max_test_fraction"),
        (lambda: TaskConfig(min_items=1), "tasks.min_items"),
        (lambda: Preset("p", "tiny", pool=()), "preset.pool"),
        (lambda: Preset("p", "tiny", pool=("a", "a")), "preset.pool"),
        (lambda: Preset("p", "tiny", pool=("a", "b"), pairs=(("a", "c"),)), "preset.pairs"),
        (lambda: Preset("p", "tiny", pool=("a", "b"), pairs=(("a", "a"),)), "preset.pairs"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


def test_checkpoint_steps():
    assert ZooConfig(steps=10, keep_last=3, save_every=2).checkpoint_steps(10) == [6, 8, 10]
    assert ZooConfig(steps=6, keep_last=2).checkpoint_steps(4) == [3, 4]
    assert ZooConfig(steps=5, keep_last=1).checkpoint_steps(5) == [5]


def test_presets_are_valid():
    for name in ("tiny", "small"):
        p = get_preset(name)
        assert p.name == name
        assert set(a for pr in p.pairs for a in pr) <= set(p.pool)
    assert get_preset("tiny").base == "tiny"


# ---------------------------------------------------------------- --set overrides


def test_apply_overrides_parses_types(tiny_preset):
    p = apply_overrides(
        tiny_preset,
        [
            "zoo.steps=3",
            "zoo.seeds=0,1",
            "zoo.lr=0.5",
            "zoo.target_modules=q_proj,k_proj",
            "delta.n_probes=20",
            "tasks.split_seed=7",
            "tasks.max_test_fraction=0.25",
        ],
    )
    assert p.zoo.steps == 3 and isinstance(p.zoo.steps, int)
    assert p.zoo.seeds == (0, 1)
    assert p.zoo.lr == 0.5
    assert p.zoo.target_modules == ("q_proj", "k_proj")
    assert p.delta.n_probes == 20
    assert p.tasks.split_seed == 7 and p.tasks.max_test_fraction == 0.25
    # everything else untouched, and the original preset is not modified
    assert p.zoo.rank == tiny_preset.zoo.rank and p.pool == tiny_preset.pool
    assert tiny_preset.zoo.steps == 6 and tiny_preset.zoo.seeds == (0,)
    assert apply_overrides(tiny_preset, []) == tiny_preset
    # later overrides of the same field win
    assert apply_overrides(tiny_preset, ["zoo.steps=3", "zoo.steps=4"]).zoo.steps == 4


def test_apply_overrides_pool_keeps_only_pairs_inside_it(tiny_preset):
    ((a, b),) = tiny_preset.pairs
    others = tuple(t for t in tiny_preset.pool if t not in (a, b))
    p = apply_overrides(tiny_preset, [f"pool={a},{b}"])
    assert p.pool == (a, b) and p.pairs == ((a, b),)
    p = apply_overrides(tiny_preset, [f"pool={a},{','.join(others)}"])
    assert p.pool == (a, *others) and p.pairs == ()
    with pytest.raises(ConfigError, match="preset.pool must name at least one task"):
        apply_overrides(tiny_preset, ["pool="])


def test_apply_overrides_bool(tiny_preset):
    for value, want in (("true", True), ("1", True), ("False", False), ("0", False)):
        assert apply_overrides(tiny_preset, [f"generator.shuffle_delta={value}"]).generator.shuffle_delta is want
    with pytest.raises(ConfigError, match="'maybe' is not a valid"):
        apply_overrides(tiny_preset, ["generator.shuffle_delta=maybe"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("zoo.nope=1", r"zoo has no field 'nope'.*steps"),
        ("model.steps=1", "expected tasks\\|zoo\\|delta"),
        ("zoo.steps", "expected tasks\\|zoo\\|delta"),
        ("steps=3", "expected tasks\\|zoo\\|delta"),
        ("zoo.steps=abc", "'abc' is not a valid"),
        ("zoo.seeds=0,x", "is not a valid"),
        ("zoo.rank=0", "zoo.rank must be >= 1"),
        ("zoo.steps=1", "zoo.keep_last"),  # 2 checkpoints no longer fit
        ("delta.n_probes=7", "delta.n_probes"),
    ],
)
def test_apply_overrides_errors(tiny_preset, override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny_preset, [override])
