"""The task registry: every known task, its source, its domain, and why candidates were dropped.

A task name is the BIG-bench task path with ``/`` replaced by ``.``; ``syn.*`` tasks are
generated in code (for the ``tiny`` preset and tests). User tasks from JSONL files are
added at run time with ``--tasks-file`` (see ``tasks.load_user_specs``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's items come from and how it is scored."""

    name: str
    """Unique task name."""
    domain: str
    """Domain label used for silhouettes and leave-one-domain-out splits."""
    source: str
    """``bigbench:<task path>``, ``jsonl:<file>`` or ``synthetic:<generator>``."""
    kind: str | None = None
    """``mc`` or ``exact``; None takes the source's own preferred metric."""
    note: str = ""
    """Why the task is in the pool, or why it was dropped."""


def _bb(path: str, domain: str, kind: str | None = None, note: str = "") -> TaskSpec:
    return TaskSpec(name=path.replace("/", "."), domain=domain, source=f"bigbench:{path}", kind=kind, note=note)


# Candidates for the `small` pool, picked for learnable structure (formats, mappings,
# algorithms) rather than world knowledge a 135M model lacks. Each is measured by
# `deltalora zoo build`; those whose reference LoRA does not beat the base model by
# >= 5 accuracy points on test go to DROPPED with the measured numbers.
CANDIDATES: tuple[TaskSpec, ...] = (
    # arithmetic (MC over BIG-bench's 7 choices; exact match costs a decode per item)
    _bb("arithmetic/2_digit_addition", "arithmetic", kind="mc"),
    _bb("arithmetic/2_digit_subtraction", "arithmetic", kind="mc"),
    _bb("arithmetic/2_digit_multiplication", "arithmetic", kind="mc"),
    _bb("arithmetic/3_digit_addition", "arithmetic", kind="mc"),
    # algorithms and codes
    _bb("cs_algorithms/valid_parentheses", "algorithms"),
    _bb("cs_algorithms/lcs", "algorithms"),
    _bb("color/hex", "algorithms"),
    _bb("color/rgb", "algorithms"),
    # language: morphology and syntax mappings
    _bb("linguistic_mappings/plural_json", "language"),
    _bb("linguistic_mappings/past_tense_json", "language"),
    _bb("linguistic_mappings/sentence_negation_json", "language"),
    _bb("hyperbaton", "language"),
    # logic
    _bb("epistemic_reasoning", "logic"),
    _bb("navigate", "logic"),
    _bb("logical_deduction/three_objects", "logic"),
    _bb("implicatures", "logic"),
    # commonsense and everyday knowledge
    _bb("goal_step_wikihow/step_inference", "commonsense"),
    _bb("goal_step_wikihow/goal_inference", "commonsense"),
    _bb("date_understanding", "commonsense"),
    _bb("intent_recognition", "commonsense"),
    # science and measurement
    _bb("unit_conversion/si_conversion", "science"),
    _bb("unit_conversion/unit_identification", "science"),
    _bb("unit_conversion/different_systems", "science"),
    _bb("physics", "science"),
    # second round, after the first measurements left commonsense with 2 passing tasks
    _bb("arithmetic/3_digit_subtraction", "arithmetic", kind="mc"),
    _bb("linguistic_mappings/question_formation_json", "language"),
    _bb("disambiguation_qa", "commonsense"),
    _bb("ruin_names", "commonsense"),
    _bb("movie_recommendation", "commonsense"),
    _bb("goal_step_wikihow/step_ordering", "commonsense"),
    _bb("unit_conversion/novel_systems", "science"),
)

# Filled from measurements (results/zoo_small.json): name -> reason.
DROPPED: dict[str, str] = {
    "unit_conversion.unit_identification": "base model already at 0.99 on 200 test items (measured): "
    "no room for a 5-point gain",
    "color.hex": "LoRA gain +0.045 (0.185 -> 0.230 on 200 test items), below the 5-point bar",
    "epistemic_reasoning": "LoRA gain -0.005 (0.635 -> 0.630 on 200 test items)",
    "implicatures": "LoRA gain -0.030 (0.515 -> 0.485 on 200 test items)",
    "logical_deduction.three_objects": "LoRA gain -0.080 (0.400 -> 0.320 on 50 test items)",
    "goal_step_wikihow.goal_inference": "LoRA gain +0.020 (0.230 -> 0.250 on 200 test items)",
    "goal_step_wikihow.step_inference": "LoRA gain +0.030 (0.175 -> 0.205 on 200 test items)",
    "goal_step_wikihow.step_ordering": "LoRA gain +0.045 (0.505 -> 0.550 on 200 test items), below the 5-point bar",
    "navigate": "passes (+0.070, 0.560 -> 0.630) but is the only passing task of the logic domain, "
    "which needs 3; the other logic candidates did not move",
}

DEFAULT_POOL: tuple[str, ...] = tuple(s.name for s in CANDIDATES if s.name not in DROPPED)

PAIRS: tuple[tuple[str, str], ...] = (
    ("arithmetic.2_digit_addition", "color.rgb"),
    ("linguistic_mappings.plural_json", "unit_conversion.si_conversion"),
    ("arithmetic.2_digit_subtraction", "intent_recognition"),
)

SYNTHETIC: tuple[TaskSpec, ...] = (
    TaskSpec("syn.add", "math", "synthetic:add", note="a+b with MC over nearby sums"),
    TaskSpec("syn.parity", "math", "synthetic:parity", note="is a number even or odd (MC)"),
    TaskSpec("syn.copy", "strings", "synthetic:copy", note="repeat a word (exact match)"),
    TaskSpec("syn.first", "strings", "synthetic:first", note="first letter of a word (MC)"),
)
TINY_POOL: tuple[str, ...] = tuple(s.name for s in SYNTHETIC)
TINY_PAIRS: tuple[tuple[str, str], ...] = (("syn.add", "syn.copy"),)

BUILTIN: dict[str, TaskSpec] = {s.name: s for s in CANDIDATES + SYNTHETIC}
