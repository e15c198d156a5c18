"""The research questions a report answers first, and which declared comparison answers which.

Each declared comparison belongs to one question (``cv.question_of`` tags them where they are declared); the report
opens with one sentence per question, composed from the comparisons' corrected tests, or says where the question
was declared and not run, or that no run on this zoo asks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltalora.experiments.answers import caveat, difference


@dataclass(frozen=True)
class Question:
    """One question the report answers before its tables."""

    id: str
    """Short name in the report (``RQ1`` ...)."""
    asks: str
    """The question, as the reader would ask it."""
    named: str = ""
    """Comparisons whose key holds this text are the question's own tests: the answer names each of them, detected
    or not, however many others there are."""


RQ1 = Question("RQ1", "On tasks it was trained on, does a generated adapter do what the task's own LoRA does?")
RQ2 = Question(
    "RQ2",
    "On held-out tasks and held-out families, does a generator beat the mean training adapter, retrieval, the "
    "top-k retrieval mixture and the multi-task LoRA?",
)
DELTA = Question("δ", "Does δ supervision (or training end to end through the base model) change that?")
RQ3 = Question("RQ3", "With fewer training tasks or corrupted weight targets, does δ supervision help?")
RQ4 = Question(
    "RQ4", "Does decoding a sum of δ compose two tasks as well as merging or union training?", named="G(δa + δb) - "
)
CONTROLS = Question("controls", "Do the generators read their prompts, and do the ablations matter?")
QUESTIONS: tuple[Question, ...] = (RQ1, RQ2, DELTA, RQ3, RQ4, CONTROLS)
"""In the order the report answers them."""

LIST_ALL = 6
"""Up to this many comparisons a sentence names every one; beyond it, the detected ones and the largest other."""


def _one(key: str, c: dict) -> str:
    means = f"{c['means'][0]:.3f} vs {c['means'][1]:.3f}, " if c.get("means") else ""
    why = caveat(c)
    return f"{key} ({means}{difference(c['across_tasks'])}, p_Holm {c['p_holm']:.2g}{f'; {why}' if why else ''})"


def sentence(comparisons: dict[str, dict], named: str = "") -> str:
    """The answer from a question's comparisons: which differences the corrected tests detect (better, worse), and
    which they do not, each with both means where given (``means``, over the tasks both scored), its difference,
    t-interval across tasks and Holm p; beyond ``LIST_ALL`` comparisons, the undetected ones are counted and only
    the largest is named, besides those whose key holds ``named``."""
    words = {"better": [], "worse": [], "not detected": []}
    for key, c in comparisons.items():
        words.setdefault(c["verdict"], []).append(key)
    out = []
    for verdict in ("better", "worse"):
        if words[verdict]:
            out.append(f"{verdict.capitalize()}: " + "; ".join(_one(k, comparisons[k]) for k in words[verdict]))
    quiet = words["not detected"]
    own = [k for k in quiet if named and named in k] if len(comparisons) > LIST_ALL else quiet
    if own:
        out.append("Not detected: " + "; ".join(_one(k, comparisons[k]) for k in own))
    if rest := [k for k in quiet if k not in own]:
        top = max(rest, key=lambda k: abs(comparisons[k]["across_tasks"]["diff_mean"]))
        n = f"{len(rest)}{' more' if own else ''} of {len(comparisons)}"
        out.append(f"Not detected in {n}; the largest: {_one(top, comparisons[top])}")
    return ". ".join(out) + "."


def question_lines(
    found: dict[str, dict[str, dict]], declared: dict[str, list[str]], sections: dict[str, list[str]] | None = None
) -> list[str]:
    """One line per question: ``found`` maps a question's id to its comparisons with results (key → comparison);
    ``declared`` maps it to where comparisons for it are declared without results (folder names); ``sections``
    to the sections that answer it without a declared comparison (the grid's seed intervals)."""
    L = []
    for q in QUESTIONS:
        head = f"- **{q.id}** — {q.asks} "
        if found.get(q.id):
            more = f" More declared in {', '.join(declared[q.id])}, no results yet." if declared.get(q.id) else ""
            L.append(head + sentence(found[q.id], q.named) + more)
        elif q.id in (sections or {}):
            L.append(head + f"No declared comparison; answered with seed intervals in {', '.join(sections[q.id])}.")
        elif declared.get(q.id):
            L.append(head + f"Not answered yet: declared in {', '.join(declared[q.id])}, no results (below).")
        else:
            L.append(head + "Not asked by any run in this report.")
    return L
