"""The generate / verify / regenerate loop shared by Levels 3 and 4 (pure logic, no Ray).

Round 1 generates an answer for every item in ONE batched LLM call (the in-context prefix is
shared, which is what batching and prefix caching exploit). Every answer is checked; the failures
get a regeneration prompt that names their problems, and only those are batched into the next
round, up to ``max_attempts`` rounds. Every attempt is kept as an ``ATTEMPT`` dict, and an item
whose attempts all fail keeps its best one with ``verified=False``: nothing is ever dropped.

One exception: an item left without text because generation itself failed (an ``error``
Generation: untemplatable prompt, over budget, engine or server failure) is not an answer at all.
``fail_unanswered`` turns its record into an error row naming the generation error, so a broken
LLM can never commit ``ok`` rows with empty captions.

Every check reports :class:`Issue` (a check name from the fixed ``CHECKS`` and a message): the
regeneration prompt and the stored ``ATTEMPT`` rows get the messages, the verify-failure metric the
check names. The loop itself keeps no counters: each :class:`Outcome` carries the failed checks of
its attempts, and :func:`report_attempts` hands them to the runner on the record, which counts
them into the level's metrics (see ``grand_pipeline.stage.LLM_ATTEMPTS_FIELD``).

The local text checks both levels use (sentence count, clean ending, forbidden wording) live here
too; the content checks (repetition, relevance by lemma) are in :mod:`levels.text`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from grand_pipeline.models.roles import LLM, ChatPrompt, Generation
from grand_pipeline.stage import LLM_ATTEMPTS_FIELD, ImageRecord
from prompts.base import PromptTemplate

logger = logging.getLogger(__name__)

PromptFn = Callable[[int, "list[str] | None"], ChatPrompt]
"""(item index, problems of its previous attempt or None on attempt 1) -> the prompt to send."""
GenerateFn = Callable[[list[ChatPrompt], int], list[Generation]]
"""(prompts, attempt number) -> one Generation per prompt, from one batched LLM call."""
VerifyFn = Callable[[list[int], list[Generation]], list[list["Issue"]]]
"""(item indices, their answers) -> problems per answer; an empty list means it passed.
Only answers with text are verified; it may itself make one batched LLM call."""

ISSUE_EMPTY = "the answer was empty"
ISSUE_CUT_OFF = "the answer was cut off before it finished"
ISSUE_ENDING = "does not end with '.', '!' or '?'"

#: Every check a problem can belong to. They tag the verify-failure metric, so the set is fixed
#: here (an unknown name is a bug, refused at once) and the metric's series count stays bounded.
CHECKS = frozenset(
    {
        "generation_error", "empty", "cut_off", "ending", "sentences", "paragraphs", "wording",
        "objects", "repetition", "relevance",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Issue:
    """One problem of an answer: which check found it, and the words the regeneration prompt and
    the stored attempt show."""

    check: str
    message: str

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; known: {', '.join(sorted(CHECKS))}")

    def __str__(self) -> str:
        return self.message


@dataclass
class Outcome:
    """What the loop settled on for one item."""

    text: str
    verified: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    failed_checks: list[list[str]] = field(default_factory=list)
    """Per attempt, the sorted names of the checks it failed ([] when it passed)."""

    @property
    def regenerated(self) -> bool:
        return len(self.attempts) > 1

    @property
    def generation_error(self) -> str | None:
        """The last generation error when it left the item without text, else None.

        An empty answer the model did write (no error) is not a generation error: it stays an
        unverified, empty result as before. Text from any attempt also wins over earlier errors.
        """
        if self.text:
            return None
        failed = [a for a in self.attempts if a["finish_reason"] == "error"]
        if not failed:
            return None
        issues = failed[-1]["issues"]
        return str(issues[0]) if issues else "generation failed: unknown error"


def generation_issues(gen: Generation) -> list[Issue]:
    """Problems of an answer that need no reading: an error, an empty text, no natural stop."""
    if gen.finish_reason == "error":
        return [Issue("generation_error", f"generation failed: {gen.error or 'unknown error'}")]
    if not gen.text.strip():
        return [Issue("empty", ISSUE_EMPTY)]
    if gen.finish_reason != "stop":
        return [Issue("cut_off", f"{ISSUE_CUT_OFF} (finish_reason '{gen.finish_reason}')")]
    return []


def make_attempt(number: int, gen: Generation, issues: list[Issue]) -> dict[str, Any]:
    """One ``schemas.ATTEMPT`` row: the problems as their messages (the schema stores strings)."""
    return {
        "attempt": number,
        "text": gen.text.strip(),
        "passed": not issues,
        "issues": [issue.message for issue in issues],
        "finish_reason": gen.finish_reason,
        "prompt_tokens": int(gen.prompt_tokens),
        "completion_tokens": int(gen.completion_tokens),
    }


def best_attempt(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The attempt to keep: a passed one, else the fewest problems (ties: the latest).

    An attempt without text never beats one with text, whatever the counts: an empty answer has
    a single problem, but a caption with two doubtful words is still the more useful row.
    """
    return max(attempts, key=lambda a: (a["passed"], bool(a["text"]), -len(a["issues"]), a["attempt"]))


def run_verified(
    count: int,
    prompt: PromptFn,
    generate: GenerateFn,
    verify: VerifyFn,
    max_attempts: int,
) -> list[Outcome]:
    """Run the loop over ``count`` items; one Outcome per item, in order."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    attempts: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    checks: list[list[list[str]]] = [[] for _ in range(count)]
    problems: list[list[Issue] | None] = [None] * count
    pending = list(range(count))
    for number in range(1, max_attempts + 1):
        if not pending:
            break
        gens = generate([prompt(i, _messages(problems[i])) for i in pending], number)
        if len(gens) != len(pending):
            raise ValueError(f"LLM returned {len(gens)} answers for {len(pending)} prompts")
        found = [generation_issues(g) for g in gens]
        # Errors and empty answers have nothing to read; everything else (even a cut-off answer)
        # is verified, so that its problem list is complete for the regeneration prompt.
        readable = [k for k, g in enumerate(gens) if g.finish_reason != "error" and g.text.strip()]
        if readable:
            extra = verify([pending[k] for k in readable], [gens[k] for k in readable])
            if len(extra) != len(readable):
                raise ValueError(f"verifier returned {len(extra)} results for {len(readable)} answers")
            for k, more in zip(readable, extra, strict=True):
                found[k] = found[k] + list(more)
        still: list[int] = []
        for item, gen, issues in zip(pending, gens, found, strict=True):
            attempts[item].append(make_attempt(number, gen, issues))
            checks[item].append(sorted({issue.check for issue in issues}))
            problems[item] = issues
            if issues:
                still.append(item)
        logger.info("attempt %d: %d of %d answers passed", number, len(pending) - len(still), len(pending))
        pending = still
    outcomes = []
    for tried, failed in zip(attempts, checks, strict=True):
        best = best_attempt(tried) if tried else None
        text, verified = (best["text"], bool(best["passed"])) if best else ("", False)
        outcomes.append(Outcome(text=text, verified=verified, attempts=tried, failed_checks=failed))
    return outcomes


def _messages(issues: list[Issue] | None) -> list[str] | None:
    return None if issues is None else [issue.message for issue in issues]


def report_attempts(record: ImageRecord, stage: str, outcome: Outcome) -> None:
    """Hand the runner the failed checks of each of ``stage``'s attempts on ``record``.

    They travel on the record (a field no row reads) rather than through process-wide state, so
    the counts belong to whatever level the runner is running. Set, not appended: a stage that
    reruns an image after a failed batch reports that image's attempts once.
    """
    record.fields.setdefault(LLM_ATTEMPTS_FIELD, {})[stage] = [list(c) for c in outcome.failed_checks]


def llm_generate(llm: LLM, temperature: float, first_temperature: float | None = None) -> GenerateFn:
    """A GenerateFn over ``llm``: the seed is the attempt number, so reruns give the same answers
    while a regeneration does not repeat the sampling of the attempt before it. Attempt 1 uses
    ``first_temperature`` when one is given."""

    def generate(prompts: list[ChatPrompt], attempt: int) -> list[Generation]:
        now = first_temperature if attempt == 1 and first_temperature is not None else temperature
        return llm.generate(prompts, temperature=now, seed=attempt)

    return generate


def format_issues(issues: Iterable[str]) -> str:
    """Problems as one clause for a regeneration prompt."""
    return "; ".join(issues)


def fail_unanswered(record: ImageRecord, stage: str, outcome: Outcome) -> bool:
    """Make ``record`` an error row of ``stage`` when generation failed and left no text.

    The error names the generation error ("generation failed: ...") and how many attempts were
    made. Returns True when the record was failed.
    """
    error = outcome.generation_error
    if error is None:
        return False
    tried = len(outcome.attempts)
    message = f"{error} (no answer after {tried} attempt{'' if tried == 1 else 's'})"
    logger.warning("%s: %s", record.image_id, message)
    record.fail(stage, message)
    return True


def stamp_prompts(record: ImageRecord, templates: Iterable[PromptTemplate]) -> None:
    """Append (prompt, version) stamps to the record's provenance, once each."""
    stamps = record.fields.setdefault("prompt_versions", [])
    for template in templates:
        stamp = template.stamp()
        if stamp not in stamps:
            stamps.append(stamp)


# ----------------------------------------------------------------------------- text checks

#: A sentence ends at . ! or ? (possibly followed by closing quotes/brackets) and then a space.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLEAN_END = re.compile(r"[.!?][\"')\]]*$")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``; decimals ("3.5") do not split, abbreviations ("Mr. X") do."""
    return [part for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def sentence_issues(text: str, low: int, high: int) -> list[Issue]:
    """A problem when the sentence count is outside [low, high]."""
    n = count_sentences(text)
    if low <= n <= high:
        return []
    return [Issue("sentences", f"has {n} sentence{'' if n == 1 else 's'}; it needs {low} to {high}")]


def ending_issues(text: str) -> list[Issue]:
    """A problem when the text stops mid-sentence."""
    return [] if _CLEAN_END.search(text.strip()) else [Issue("ending", ISSUE_ENDING)]


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def wording_issues(text: str, patterns: Iterable[re.Pattern[str]], what: str) -> list[Issue]:
    """One problem per forbidden pattern found, quoting the offending words."""
    issues = []
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            issues.append(Issue("wording", f"{what} ('{match.group(0)}')"))
    return issues
