"""Nothing lost: hostile output paths for every writer, concurrent writers, a kill between the renames, disk full.

After every case each file that existed before is still there, byte for byte; refusals are one line
naming the path with exit code 2; what is written follows the umask.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltalora
from deltalora import io as dio
from deltalora.cli import main
from deltalora.errors import OutputError
from deltalora.generator.encoder import PromptEncoder
from deltalora.generator.generate import generate
from deltalora.generator.retrieval import build_retrieval
from deltalora.io import atomic_write_json, remove_stale_tmp
from deltalora.outputs import MARKER, atomic_dir, check_output_dir, own_dir

# subprocesses import the package this test imported, whatever their working folder
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(Path(deltalora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
}
CLI = [sys.executable, "-m", "deltalora"]
PROMPTS = [f"{i} plus {i} equals" for i in range(6)]
TRIED: collections.Counter = collections.Counter()  # hostile cases per category, printed for docs/reliability.md


def snapshot(root: Path) -> dict[str, object]:
    """Every file (bytes) and symbolic link (target) under root, links not followed."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def assert_kept(before: dict[str, object], *skip: Path) -> None:
    for name, content in before.items():
        if any(name == str(s) or name.startswith(str(s) + os.sep) for s in skip):
            continue
        p = Path(name)
        got = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        assert got == content, f"{name} lost or changed"


# ------------------------------------------------------------------ the policy, fuzzed in-process

CATEGORIES = [
    "absent",
    "absent_deep",
    "empty",
    "user_files",
    "user_files_hidden",
    "own_same",
    "own_same_with_card",
    "own_other_kind",
    "legacy_same",
    "mid_replacement",
    "file",
    "under_file",
    "symlink_to_dir",
    "symlink_to_file",
    "dangling_symlink",
    "dot",
    "dotdot",
    "cwd_absolute",
    "cwd_parent",
    "home",
    "root",
    "workspace",
    "zoo",
    "inside_zoo",
    "inside_delta",
    "readonly_empty",
    "readonly_user_files",
]
KINDS = ["adapter", "generator", "retrieval"]
_LEGACY_FILE = {
    "adapter": ("provenance.json", {"prompts_sha256": "x"}),
    "generator": ("train_config.json", {"train_tasks": []}),
    "retrieval": ("config.json", {"kind": "retrieval"}),
}
names = st.text("abcdefgh.-_ 0123456789é", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


def _mark(folder: Path, kind: str, files: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f).write_bytes(os.urandom(8))
    (folder / MARKER).write_text(json.dumps({"kind": kind, "written_by": "deltalora", "version": 1, "files": files}))


def _scene(box: Path, category: str, kind: str, data) -> tuple[Path, bool]:
    """Build the sandbox (a home, a current folder, a workspace) and the target; returns (target, allowed-if-flags)."""
    home, cwd, ws = box / "home", box / "cwd", box / "ws"
    for d in (home, cwd / "sub", ws / "generators"):
        d.mkdir(parents=True)
    (home / ".bashrc").write_text("keep")
    (cwd / "notes.txt").write_text("important")
    (cwd / "sub" / "a").write_text("x")
    _mark(ws / "zoo", "zoo", ["config.json"])
    _mark(ws / "delta", "delta", ["deltas_p5.safetensors"])
    user = {
        n: data.draw(st.binary(max_size=64)) for n in data.draw(st.lists(names, min_size=1, max_size=4, unique=True))
    }
    other = next(k for k in KINDS if k != kind)
    t = cwd / "out"
    if category == "absent_deep":
        t = cwd / "a" / "b" / "out"
    elif category == "empty":
        t.mkdir()
    elif category in ("user_files", "readonly_user_files"):
        t.mkdir()
        for n, b in user.items():
            (t / n).write_bytes(b)
    elif category == "user_files_hidden":  # looks like ours at a glance: a marker of someone else
        t.mkdir()
        (t / MARKER).write_text(json.dumps({"kind": kind, "written_by": "someone"}))
        (t / "w.bin").write_bytes(b"1")
    elif category == "own_same":
        _mark(t, kind, ["w.bin"])
    elif category == "own_same_with_card":
        _mark(t, kind, ["w.bin"])
        (t / "README.md").write_text("a model card someone wrote")
    elif category == "own_other_kind":
        _mark(t, other, ["w.bin"])
    elif category == "legacy_same":
        t.mkdir()
        f, doc = _LEGACY_FILE[kind]
        (t / f).write_text(json.dumps(doc))
    elif category == "mid_replacement":
        _mark(t.with_name(".out.deltalora-old"), kind, ["w.bin"])
    elif category == "file":
        t.write_bytes(b"a file")
    elif category == "under_file":
        (cwd / "f").write_text("a file")
        t = cwd / "f" / "out"
    elif category == "symlink_to_dir":
        t.symlink_to(cwd / "sub")
    elif category == "symlink_to_file":
        t.symlink_to(cwd / "notes.txt")
    elif category == "dangling_symlink":
        t.symlink_to(cwd / "nowhere")
    elif category == "readonly_empty":
        t.mkdir()
    target = {
        "dot": Path("."),
        "dotdot": Path(".."),
        "cwd_absolute": cwd,
        "cwd_parent": box,
        "home": home,
        "root": Path("/"),
        "workspace": ws,
        "zoo": ws / "zoo",
        "inside_zoo": ws / "zoo" / "adapters" / "x",
        "inside_delta": ws / "delta" / "out",
    }.get(category, t)
    if category.startswith("readonly"):
        t.chmod(0o555)
    return target, category


@pytest.mark.parametrize("category", CATEGORIES)  # every category, each with its own random variations
@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), overwrite=st.booleans(), resume=st.booleans(), data=st.data())
def test_output_policy_fuzzed(category, kind, overwrite, resume, data):
    TRIED[category] += 1
    base = Path(tempfile.mkdtemp(prefix="dl_safety_"))
    old_cwd, old_home = os.getcwd(), os.environ.get("HOME")
    try:
        box = base / "box"
        target, _ = _scene(box, category, kind, data)
        os.environ["HOME"] = str(box / "home")
        os.chdir(box / "cwd")
        before = snapshot(box)
        flags_ok = overwrite or resume
        root_user = os.geteuid() == 0  # root writes into read-only folders
        expected = {
            "absent": True,
            "absent_deep": True,
            "empty": True,
            "readonly_empty": root_user,
            "own_same": flags_ok,
            "legacy_same": flags_ok,
            "mid_replacement": flags_ok,
            "own_same_with_card": resume and not overwrite,
        }.get(category, False)
        try:
            state = check_output_dir(
                target, kind, overwrite=overwrite, resume=resume, protected=(box / "ws" / "zoo", box / "ws" / "delta")
            )
        except OutputError as e:
            assert not expected, f"{category}: refused: {e}"
            assert str(target) in str(e) and "\n" not in str(e)
            assert snapshot(box) == before
            return
        assert expected, f"{category}: allowed as {state!r}"
        # allowed: really write, then nothing outside the replaced folder of ours may differ
        backup = target.with_name(".out.deltalora-old")
        if state == "own" and not overwrite:  # resumed in place: everything stays (a crashed replacement rolled back)
            own_dir(target, kind)
            (target / "added.bin").write_bytes(b"new")
            assert_kept({k.replace(str(backup), str(target)): v for k, v in before.items()})
        else:
            with atomic_dir(target, kind, overwrite=overwrite) as tmp:
                (tmp / "added.bin").write_bytes(b"new")
            assert (target / "added.bin").read_bytes() == b"new"
            assert_kept(before, *((target, backup) if state == "own" else ()))
        assert not backup.exists()
        assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    finally:
        os.chdir(old_cwd)
        os.environ["HOME"] = old_home or ""
        for p in base.rglob("*"):  # read-only folders would stop rmtree as a normal user
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(base)


def test_print_counts():
    """Not a check: prints how many hostile cases the fuzzer tried (``pytest -s``), for docs/reliability.md."""
    print("\nhostile output-path cases tried:", sum(TRIED.values()), dict(sorted(TRIED.items())))


def test_remove_stale_tmp_removes_only_its_own_temporaries(tmp_path):
    mine = [".config.json.ab3_x9zq.tmp", ".step00004.k2j4l5m6.tmp"]
    users = [".notes.tmp", ".x.tmp", ".config.json.tmp", ".a.toolong123.tmp", "b.abcdefgh.tmp", ".c.ABCDEFGH.tmp"]
    for n in mine + users:
        (tmp_path / n).write_text("x")
    (tmp_path / ".dir.q1w2e3r4.tmp").mkdir()
    remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users)


# ------------------------------------------------------------------ real writers


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder()


@pytest.fixture(scope="module")
def index(tiny_zoo, tmp_path_factory, encoder):
    """A retrieval index: the cheapest generator ``generate`` accepts."""
    out = tmp_path_factory.mktemp("safety") / "index"
    return build_retrieval(tiny_zoo.preset, tiny_zoo.ws, out, list(tiny_zoo.preset.pool), encoder=encoder)


@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(index, encoder, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "ad"
        generate(index, PROMPTS, out, encoder=encoder)
        generate(index, PROMPTS, out, seed=1, encoder=encoder, overwrite=True)
        atomic_write_json(tmp_path / "results" / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert _mode(out) == 0o777 & ~umask
    files = [out / n for n in ("adapter_config.json", "adapter_model.safetensors", "provenance.json", MARKER)]
    files.append(tmp_path / "results" / "r.json")
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


def error_lines(stderr: str) -> list[str]:
    """The CLI's user-error lines (stderr also carries INFO logs and progress bars)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def refused(monkeypatch, capsys, argv: list, path: Path, watch: Path) -> None:
    """Run the CLI in-process: exit 2, one line naming ``path``, every file under ``watch`` unchanged."""
    before = snapshot(watch)
    monkeypatch.setattr(sys, "argv", ["deltalora", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        main()
    text = capsys.readouterr().err
    err = error_lines(text)
    assert e.value.code == 2 and len(err) == 1 and str(path) in err[0] and "Traceback" not in text, text
    assert snapshot(watch) == before


def _user_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("important")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "a").write_bytes(os.urandom(32))
    return root


def test_every_writing_verb_refuses_a_folder_it_did_not_write(tiny_zoo, index, prompts, tmp_path, monkeypatch, capsys):
    tiny = ["--preset", "tiny"]
    user = _user_folder(tmp_path / "user")
    refused(monkeypatch, capsys, ["generate", "-g", index, "--prompts", prompts, "--out", user], user, tmp_path)
    refused(
        monkeypatch,
        capsys,
        ["generate", "-g", index, "--prompts", prompts, "--out", user, "--overwrite"],
        user,
        tmp_path,
    )
    inside = tiny_zoo.root / "adapters" / "mine"
    refused(
        monkeypatch,
        capsys,
        ["generate", "-g", index, "--prompts", prompts, "--out", inside],
        inside,
        tiny_zoo.workspace,
    )
    refused(
        monkeypatch,
        capsys,
        ["generate", "-g", index, "--prompts", prompts, "--out", index, "--overwrite"],
        index,
        index,
    )
    refused(
        monkeypatch,
        capsys,
        ["train-generator", *tiny, "--workspace", tiny_zoo.workspace, "--out", user],
        user,
        tmp_path,
    )
    refused(
        monkeypatch,
        capsys,
        [
            "train-generator",
            *tiny,
            "--workspace",
            tiny_zoo.workspace,
            "--variant",
            "retrieval",
            "--out",
            user,
            "--overwrite",
        ],
        user,
        tmp_path,
    )
    refused(
        monkeypatch,
        capsys,
        ["train-generator", *tiny, "--workspace", tiny_zoo.workspace, "--out", tiny_zoo.workspace / "delta" / "g"],
        tiny_zoo.workspace / "delta" / "g",
        tiny_zoo.workspace,
    )
    _user_folder(tmp_path / "ws0" / "zoo")
    refused(
        monkeypatch,
        capsys,
        ["zoo", "build", *tiny, "--workspace", tmp_path / "ws0"],
        tmp_path / "ws0" / "zoo",
        tmp_path,
    )
    ws = tmp_path / "ws"
    shutil.copytree(tiny_zoo.root, ws / "zoo")
    _user_folder(ws / "delta")
    refused(monkeypatch, capsys, ["delta", "compute", *tiny, "--workspace", ws], ws / "delta", tmp_path)
    refused(
        monkeypatch,
        capsys,
        ["assess", *tiny, "-g", index, "--workspace", tiny_zoo.workspace, "--out", user],
        user,
        tmp_path,
    )
    refused(
        monkeypatch,
        capsys,
        ["experiment", *tiny, "--workspace", ws, "--results-dir", user / "notes.txt"],
        user / "notes.txt",
        tmp_path,
    )
    _user_folder(ws / "experiments")
    refused(
        monkeypatch,
        capsys,
        ["experiment", *tiny, "--workspace", ws, "--results-dir", tmp_path / "res"],
        ws / "experiments",
        tmp_path,
    )
    refused(monkeypatch, capsys, ["report", tmp_path / "res", "--out", user], user, tmp_path)
    refused(
        monkeypatch,
        capsys,
        ["run", *tiny, "--workspace", tiny_zoo.workspace, "--results-dir", tiny_zoo.root / "r"],
        tiny_zoo.root / "r",
        tiny_zoo.workspace,
    )
    refused(
        monkeypatch,
        capsys,
        ["zoo", "results", *tiny, "--workspace", tiny_zoo.workspace, "--out", tiny_zoo.root / "manifest.json"],
        tiny_zoo.root / "manifest.json",
        tiny_zoo.workspace,
    )
    refused(
        monkeypatch,
        capsys,
        ["delta", "report", *tiny, "--workspace", tiny_zoo.workspace, "--out", user],
        user,
        tmp_path,
    )


def _run(args: list, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *map(str, args)], env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_reproduction_out_dot_deletes_nothing(index, tmp_path):
    proj = _user_folder(tmp_path / "proj")
    (proj / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    before = snapshot(proj)
    proc = _run(["generate", "-g", index, "--prompts", "prompts.txt", "--out", "."], cwd=proj)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines() == [err.strip()] and err.startswith("error: .:"), err
    assert snapshot(proj) == before


def test_two_processes_writing_the_same_output(index, prompts, tmp_path):
    shared = _user_folder(tmp_path / "shared")
    before = snapshot(shared)
    out = shared / "ad"
    procs = [_run(["generate", "-g", index, "--prompts", prompts, "--out", out, "--seed", s]) for s in (0, 1)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    errors = error_lines(loser)
    assert len(errors) == 1 and str(out) in errors[0] and "Traceback" not in loser, loser
    marker = json.loads((out / MARKER).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *marker["files"]])
    assert json.loads((out / "provenance.json").read_text())["seed"] in (0, 1)
    assert_kept(before)
    assert not [p for p in shared.iterdir() if p.name.endswith(".tmp")]


KILLER = """
import os, signal, sys
stage, out = sys.argv[1], os.path.abspath(sys.argv[2])
real = os.rename
def rename(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if (stage == "1" and str(dst).endswith(".deltalora-old")) or (stage == "2" and os.path.abspath(dst) == out):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
from deltalora.cli import main
sys.argv = ["deltalora", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("stage", ["1", "2"])
def test_sigkill_between_the_renames_of_overwrite(index, encoder, prompts, tmp_path, stage):
    out = tmp_path / "ad"
    generate(index, PROMPTS, out, seed=0, encoder=encoder)
    old = snapshot(out)
    backup = tmp_path / ".ad.deltalora-old"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            stage,
            str(out),
            "generate",
            "-g",
            str(index),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--seed",
            "7",
            "--overwrite",
        ],
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    survivor = backup if stage == "1" else out  # killed after the old moved away / after the new moved in
    assert snapshot(backup) == {k.replace(str(out), str(backup)): v for k, v in old.items()}
    if stage == "2":
        assert json.loads((out / "provenance.json").read_text())["seed"] == 7
        new = snapshot(out)
    assert survivor.exists()
    # the next run finishes the replacement (back to the old, or forward to the new), then applies the rule
    with pytest.raises(OutputError, match="already"):
        generate(index, PROMPTS, out, seed=3, encoder=encoder)
    assert not backup.exists()
    assert snapshot(out) == (old if stage == "1" else new)


def test_disk_full_keeps_the_previous_artifact_and_says_so(index, encoder, prompts, tmp_path, monkeypatch, capsys):
    import deltalora.generator.generate as gen_mod

    out = tmp_path / "ad"
    generate(index, PROMPTS, out, seed=0, encoder=encoder)
    before = snapshot(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gen_mod, "save_file", full)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "deltalora",
            "generate",
            "-g",
            str(index),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--overwrite",
            "--seed",
            "5",
        ],
    )
    with pytest.raises(SystemExit) as e:
        main()
    text = capsys.readouterr().err
    err = error_lines(text)
    assert (
        e.value.code == 2 and len(err) == 1 and str(out) in err[0] and "intact" in err[0] and "Traceback" not in text
    ), text
    assert snapshot(tmp_path) == before  # no temporary left either
    monkeypatch.undo()
    # a results file: the write itself fails, the old file stays
    res = tmp_path / "r.json"
    atomic_write_json(res, {"old": 1})
    monkeypatch.setattr(dio.os, "fsync", full)
    with pytest.raises(OutputError, match="intact"):
        atomic_write_json(res, {"new": 2})
    monkeypatch.undo()
    assert json.loads(res.read_text()) == {"old": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
