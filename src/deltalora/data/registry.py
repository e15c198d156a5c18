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


def _family(family: str, subtasks: str, kind: str | None = None) -> tuple[TaskSpec, ...]:
    return tuple(_bb(f"{family}/{sub}", family, kind) for sub in subtasks.split())


# Candidates for the `families` pool: BIG-bench families of sibling subtasks that share a format and
# differ in the rule (counted by benchmarks/bigbench_census.py); the family is the domain label. Each is
# trained and kept when its LoRA gains >= zoo.min_gain over the base model on a validation split carved
# from train. Cheap formats are favoured: a family of long prompts costs ~3 s per training step on a CPU.
FAMILY_CANDIDATES: tuple[TaskSpec, ...] = (
    *_family(
        "arithmetic",
        "2_digit_addition 2_digit_subtraction 2_digit_multiplication 3_digit_addition 3_digit_subtraction "
        "3_digit_multiplication 3_digit_division 4_digit_addition 4_digit_subtraction 4_digit_multiplication "
        "4_digit_division 5_digit_addition 5_digit_subtraction 5_digit_multiplication 5_digit_division",
        kind="mc",
    ),
    *_family(
        "linguistic_mappings",
        "plural_json plural_regular_json past_tense_json past_tense_regular_json de_past_tense_json "
        "de_past_tense_regular_json pronoun_replacement_json question_formation_json sentence_negation_json",
    ),
    *_family("unit_conversion", "si_conversion different_systems novel_systems chained_conversion unit_identification"),
    *_family("color", "rgb hex hsl hcl"),
    # English sentences of four review domains (the `all_*` subtasks would repeat their items) and one German
    *_family(
        "multiemo",
        "hotels_sentence_en medicine_sentence_en products_sentence_en reviews_sentence_en hotels_sentence_de "
        "medicine_sentence_de products_sentence_de reviews_sentence_de hotels_sentence_fr medicine_sentence_fr",
    ),
    *_family(
        "bbq_lite_json",
        "age_ambig age_disambig gender_identity_ambig nationality_disambig religion_ambig ses_disambig "
        "disability_status_ambig physical_appearance_ambig race_ethnicity_ambig ses_ambig nationality_ambig "
        "sexual_orientation_ambig race_ethnicity_disambig gender_identity_disambig",
    ),
    # in-context rules on dates, strings and numbers: short prompts, exact match
    *_family(
        "unnatural_in_context_learning",
        "dates dates_unnatural_content dates_unnatural_content_and_form dates_unnatural_form identity "
        "reverse_natural_content reverse_to_natural_content unnatural_addition_2_digit",
    ),
    # arithmetic with a twist (+1 on every answer) and its controls; few-shot prompts of ~100 tokens
    *_family(
        "modified_arithmetic",
        "three_digit_addition_control three_digit_addition_plus_one three_digit_subtraction_control "
        "three_digit_subtraction_plus_one two_digit_multiplication_control two_digit_multiplication_plus_one",
    ),
    # added after the first build selected too few color tasks for a family of four: word problems and their
    # hinted forms (prompts of ~40-70 tokens), and line/shape intersection counts (the longer ones cut from the left)
    *_family(
        "elementary_math_qa",
        "question_only language_hint_only mathematical_hint_only question_with_language_hint "
        "question_with_mathematical_hint",
    ),
    *_family("intersect_geometry", "shapes_2 shapes_3 shapes_4 shapes_5 shapes_6"),
    # added when 70 of the 81 above were measured and only 5 families had 4 selected tasks (unit_conversion,
    # modified_arithmetic 3, color 2, elementary_math_qa 1): the two remaining BIG-bench families with >= 4 subtasks
    # of >= 250 items; prompts of 94-506 tokens, cut from the left to zoo.max_length
    *_family(
        "chess_state_tracking", "real_short real_medium real_long synthetic_short synthetic_medium synthetic_long"
    ),
    *_family(
        "list_functions",
        "01_shot_baseline 02_shot_baseline 03_shot_baseline 04_shot_baseline 05_shot_baseline 06_shot_baseline "
        "07_shot_baseline 08_shot_baseline 09_shot_baseline 10_shot_baseline",
    ),
)

# Union adapters for additivity and composition, each pair from two families (named once for every use).
FAMILY_PAIRS: tuple[tuple[str, str], ...] = (
    ("arithmetic.2_digit_addition", "linguistic_mappings.plural_json"),
    ("arithmetic.2_digit_subtraction", "unit_conversion.si_conversion"),
    ("linguistic_mappings.past_tense_json", "bbq_lite_json.age_ambig"),
    ("multiemo.hotels_sentence_en", "arithmetic.3_digit_addition"),
    ("unit_conversion.novel_systems", "linguistic_mappings.sentence_negation_json"),
    ("color.rgb", "bbq_lite_json.religion_ambig"),
)

SYNTHETIC: tuple[TaskSpec, ...] = (
    TaskSpec("syn.add", "math", "synthetic:add", note="a+b with MC over nearby sums"),
    TaskSpec("syn.parity", "math", "synthetic:parity", note="is a number even or odd (MC)"),
    TaskSpec("syn.copy", "strings", "synthetic:copy", note="repeat a word (exact match)"),
    TaskSpec("syn.first", "strings", "synthetic:first", note="first letter of a word (MC)"),
)
TINY_POOL: tuple[str, ...] = tuple(s.name for s in SYNTHETIC)
TINY_PAIRS: tuple[tuple[str, str], ...] = (("syn.add", "syn.copy"),)

# a family candidate that is also a `small` candidate keeps the `small` spec (its domain; `tasks.family_domains`
# relabels it by family in the `families` preset)
BUILTIN: dict[str, TaskSpec] = {s.name: s for s in FAMILY_CANDIDATES + CANDIDATES + SYNTHETIC}
