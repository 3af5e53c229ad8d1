"""VerifiedLLMStage: the wiring every verified LLM stage shares (Level 3's dense caption, Level 4's
additional context), so that a stage states only its prompts, its checks and the value it writes.

Per batch of records: the stage says what each prompt is filled with, or that an image has nothing
to build on (it then gets an empty, unverified value and no LLM call, rather than an invention).
The rest goes through :func:`levels.verify.run_verified` in one batched call per round: attempt 1
renders ``first``, a failed answer is regenerated with ``regenerate`` and its problems spelled out.
Each outcome becomes the stage's value; the prompts used are stamped, the attempts reported to the
runner, and an image whose every attempt failed to generate becomes an error row of the stage.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from grand_pipeline.models.roles import LLM, ChatPrompt, Generation
from grand_pipeline.stage import ImageRecord, Stage
from levels.verify import (
    GenerateFn,
    Issue,
    Outcome,
    fail_unanswered,
    format_issues,
    llm_generate,
    report_attempts,
    run_verified,
    stamp_prompts,
)
from prompts.base import PromptTemplate


class VerifiedLLMStage(Stage):
    """Base of the generate / verify / regenerate stages; writes ``output`` on every record."""

    models: ClassVar[tuple[str, ...]] = ("llm",)
    output: ClassVar[str]
    """The record field (and column) the stage writes."""
    section: ClassVar[str]
    """The config section with ``max_new_tokens``, ``temperature``, ``first_temperature`` and
    ``max_attempts`` (``level3``, ``level4``)."""
    nothing_to_say: ClassVar[str]
    """Logged for an image that gets the empty value."""

    first: PromptTemplate
    regenerate: PromptTemplate

    # ------------------------------------------------------------------ what a stage states

    def prompt_fields(self, record: ImageRecord) -> dict[str, Any] | None:
        """What the prompts of ``record`` are filled with; None when there is nothing to say."""
        raise NotImplementedError

    def empty_value(self) -> dict[str, Any]:
        """The value of an image with nothing to say: no attempt, not verified."""
        raise NotImplementedError

    def value(self, outcome: Outcome) -> dict[str, Any]:
        """The value written for an image the loop settled on."""
        raise NotImplementedError

    def check(self, records: list[ImageRecord], answers: list[Generation]) -> list[list[Issue]]:
        """Problems of each answer (with text) to its record's prompt; [] when it passed."""
        raise NotImplementedError

    def helper_prompts(self) -> list[PromptTemplate]:
        """Prompts ``check`` renders, stamped after ``first`` on every answered image."""
        return []

    def generator(self, llm: LLM) -> GenerateFn:
        """One batched call per round: the attempt number seeds the sampling."""
        return llm_generate(llm, self.settings.temperature, self.settings.first_temperature)

    def annotate(self, record: ImageRecord, outcome: Outcome) -> None:
        """Anything else the stage records on an answered image (after its attempts)."""

    # ------------------------------------------------------------------ the shared wiring

    @property
    def settings(self) -> Any:
        return getattr(self.cfg, self.section)

    def process(self, records: list[ImageRecord]) -> None:
        settings = self.settings
        llm = self.backend("llm", LLM)
        todo: list[tuple[ImageRecord, dict[str, Any]]] = []
        for record in records:
            fields = self.prompt_fields(record)
            if fields is None:
                record.fields[self.output] = self.empty_value()
                # Under the stage's own logger name, so log filters set per stage keep working.
                logging.getLogger(type(self).__module__).info("%s: %s", record.image_id, self.nothing_to_say)
            else:
                todo.append((record, fields))

        def prompt(i: int, issues: list[str] | None) -> ChatPrompt:
            fields = todo[i][1]
            if issues is None:
                return self.first.render(max_new_tokens=settings.max_new_tokens, **fields)
            return self.regenerate.render(
                max_new_tokens=settings.max_new_tokens, issues=format_issues(issues), **fields
            )

        def verify(items: list[int], answers: list[Generation]) -> list[list[Issue]]:
            return self.check([todo[i][0] for i in items], answers)

        outcomes = run_verified(len(todo), prompt, self.generator(llm), verify, settings.max_attempts)
        for (record, _), outcome in zip(todo, outcomes, strict=True):
            record.fields[self.output] = self.value(outcome)
            used = [self.first, *self.helper_prompts()] + ([self.regenerate] if outcome.regenerated else [])
            stamp_prompts(record, used)
            report_attempts(record, self.name, outcome)
            self.annotate(record, outcome)
            fail_unanswered(record, self.name, outcome)
