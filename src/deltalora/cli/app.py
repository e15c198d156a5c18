"""The ``deltalora`` Typer app, its sub-apps and the options every verb shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deltalora.config import Preset, RuntimeConfig
from deltalora.data.registry import TaskSpec
from deltalora.workspace import Workspace

if TYPE_CHECKING:
    import torch

HELP = """Behaviour-aware data-to-LoRA generation.

The verbs are the pipeline stages, in order: tasks -> zoo -> delta -> train-generator -> generate ->
evaluate / assess -> experiment -> report. `deltalora run --preset small` is the main job (zoo, Delta
Activations with 1/5/20 probes, results and plots). Every stage verb takes --preset (tiny | small | families |
gpu | families-gpu), --workspace, --tasks and --set section.field=value overrides; every verb that runs a model
takes --device (cpu by default; auto | cuda | cuda:N), and the training verbs --dtype (fp32 | bf16)."""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tasks_app = typer.Typer(
    help="List, show and prepare tasks (BIG-bench JSON, user JSONL, synthetic).", no_args_is_help=True
)
zoo_app = typer.Typer(help="Build the reference LoRA zoo and summarise it.", no_args_is_help=True)
delta_app = typer.Typer(help="Compute Delta Activations and report their quality.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(zoo_app, name="zoo")
app.add_typer(delta_app, name="delta")

PresetOpt = Annotated[
    str,
    typer.Option(
        "--preset",
        "-p",
        help="Named preset: tiny (tests), small (CPU default), families (families of BIG-bench subtasks), gpu "
        "(the full grid, for one CUDA GPU) or families-gpu (the families cross-validation with every variant from "
        "scratch and every family held out, for one CUDA GPU).",
    ),
]
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Folder for all artifacts (default runs/<preset>).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config field, e.g. --set zoo.steps=10, or the task pool: --set pool=a,b (repeatable)."
    ),
]
TasksFileOpt = Annotated[
    Path | None, typer.Option("--tasks-file", help="JSON list of user tasks {name, domain, path to JSONL}.")
]
BaseOpt = Annotated[
    str | None, typer.Option("--base", help="Base model: known name, Hub id or folder (default: the preset's).")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace a folder deltalora wrote before for the same kind of artifact (never any other folder).",
    ),
]
TensorboardOpt = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Write training curves (losses, learning rate, test accuracy) to this folder "
        "for TensorBoard (off by default; needs the tensorboard package).",
    ),
]
ProbeOpt = Annotated[int | None, typer.Option("--probes", help="Probe-set size: 1, 5 or 20 (default: the preset's).")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="Where models run: cpu, auto (CUDA when present), cuda or cuda:N; under torchrun each rank takes its "
        "LOCAL_RANK GPU (default: the preset's runtime.device, cpu except for gpu).",
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="fp32, or bf16: autocast (CUDA only) over the training forwards of zoo LoRAs and the generator network; "
        "δ and scores stay fp32 (default: the preset's runtime.dtype).",
    ),
]
TasksOpt = Annotated[
    str | None, typer.Option("--tasks", help="Comma-separated task names replacing the preset's pool.")
]


@dataclass(frozen=True)
class Run:
    """What a verb works with: the resolved preset, the user's extra tasks and the workspace."""

    preset: Preset
    extra: list[TaskSpec]
    ws: Workspace

    @property
    def device(self) -> torch.device:
        """The device the preset's ``runtime`` section (with ``--device``) resolves to on this machine."""
        from deltalora.device import runtime

        return runtime(self.preset.runtime).device


def setup(
    preset: str,
    workspace: Path | None = None,
    overrides: list[str] | None = None,
    tasks_file: Path | None = None,
    base: str | None = None,
    tasks: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Run:
    """Resolve the options every stage verb shares, in one way for all of them.

    ``--device`` / ``--dtype`` override the preset's ``runtime`` section and are checked against this machine
    before any work (``--device cuda`` without CUDA is a one-line error).
    """
    from deltalora.data.jsonl import load_user_specs
    from deltalora.device import runtime
    from deltalora.presets import apply_overrides, get_preset, with_pool

    p = apply_overrides(get_preset(preset), overrides or [])
    if base:
        p = p.replace(base=base)
    if tasks:
        p = with_pool(p, tasks)
    if device or dtype:
        p = p.replace(runtime=RuntimeConfig(device or p.runtime.device, dtype or p.runtime.dtype))
        runtime(p.runtime)
    return Run(p, load_user_specs(tasks_file) if tasks_file else [], Workspace.of(workspace, p.name))


def check_outputs(ws: Workspace | None, files: tuple[Path, ...] = (), dirs: tuple[Path, ...] = ()) -> None:
    """Refuse bad result paths before any work: files that are folders, anything in the workspace's zoo or δ."""
    from deltalora.io import check_output_file
    from deltalora.outputs import check_output_dir

    keep = ws.protected if ws else ()
    for f in files:
        check_output_file(f, protected=keep)
    for d in dirs:
        check_output_dir(d, None, protected=keep)


def split_names(names: str | None) -> list[str] | None:
    """A comma-separated option as a list (None stays None)."""
    return [n.strip() for n in names.split(",") if n.strip()] if names else None
