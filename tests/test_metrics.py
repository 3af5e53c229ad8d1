"""LLM attempt and verify-failure counters: the verify loop reports each attempt's failed checks
on the record, and the runner counts them against its level (no process-wide state)."""

from __future__ import annotations

import pytest

from grand_pipeline.metrics import METRIC_NAMES, PipelineMetrics
from grand_pipeline.models.roles import ChatPrompt, Generation
from grand_pipeline.stage import LLM_ATTEMPTS_FIELD, ImageRecord
from levels.verify import Issue, ending_issues, report_attempts, run_verified, sentence_issues


def test_checks_name_themselves_and_unknown_names_are_refused() -> None:
    assert [i.check for i in sentence_issues("One. Two.", 4, 6)] == ["sentences"]
    assert [i.check for i in ending_issues("cut mid")] == ["ending"]
    with pytest.raises(ValueError, match="unknown check 'spelling'"):
        Issue("spelling", "speling")


def test_attempts_count_against_the_level_that_counts_them() -> None:
    metrics = PipelineMetrics()
    fields = {LLM_ATTEMPTS_FIELD: {"additional_context": [["empty"], ["ending", "ending"], []]}}
    metrics.count_attempts(4, fields)
    assert LLM_ATTEMPTS_FIELD not in fields  # consumed: a row never carries it
    assert metrics.llm_counts_for(4) == {"llm_attempts": {"failed": 2, "passed": 1},
                                         "verify_failures": {"empty": 1, "ending": 1}}
    assert metrics.llm_counts_for(3) == {"llm_attempts": {}, "verify_failures": {}}
    metrics.count_attempts(4, {})  # an image no LLM stage touched
    assert metrics.llm_counts_for(4)["llm_attempts"] == {"failed": 2, "passed": 1}


def test_the_verify_loop_reports_every_attempt() -> None:
    """Item 0 passes at once; item 1 fails twice (no ending, then empty) and passes third time."""
    answers = {(0, 1): "A fine answer.", (1, 1): "cut mid", (1, 2): "", (1, 3): "Now done."}

    def prompt(i: int, issues: list[str] | None) -> ChatPrompt:
        return ChatPrompt(messages=[{"role": "user", "content": str(i)}])

    def generate(prompts: list[ChatPrompt], attempt: int) -> list[Generation]:
        return [Generation(text=answers[(int(p.messages[0]["content"]), attempt)], finish_reason="stop") for p in prompts]

    outcomes = run_verified(2, prompt, generate, lambda items, gens: [ending_issues(g.text) for g in gens], max_attempts=3)
    assert [len(o.attempts) for o in outcomes] == [1, 3] and all(o.verified for o in outcomes)
    records = [ImageRecord(image_id=f"sa_{k}", shard_id="sa_0") for k in range(2)]
    for record, outcome in zip(records, outcomes, strict=True):
        report_attempts(record, "dense_caption", outcome)
        report_attempts(record, "dense_caption", outcome)  # a rerun image reports once
    metrics = PipelineMetrics()
    for record in records:
        metrics.count_attempts(3, record.fields)
    assert metrics.llm_counts_for(3) == {"llm_attempts": {"failed": 2, "passed": 2},
                                         "verify_failures": {"empty": 1, "ending": 1}}


def test_eta_inputs_are_exported() -> None:
    assert {"shards_planned", "shards_committed", "llm_attempts", "verify_failures"} <= set(METRIC_NAMES)
