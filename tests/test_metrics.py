"""LLM attempt and verify-failure counters: counted where the verify loop records attempts."""

from __future__ import annotations

from grand_pipeline.metrics import METRIC_NAMES, PipelineMetrics, issue_check, record_llm_attempt
from grand_pipeline.models.roles import ChatPrompt, Generation
from levels.verify import (
    ISSUE_CUT_OFF,
    ISSUE_EMPTY,
    ISSUE_ENDING,
    ending_issues,
    run_verified,
    sentence_issues,
)


def test_issue_texts_fold_into_a_fixed_set_of_checks() -> None:
    assert issue_check(ISSUE_EMPTY) == "empty"
    assert issue_check(f"{ISSUE_CUT_OFF} (finish_reason 'length')") == "cut_off"
    assert issue_check(ISSUE_ENDING) == "ending"
    assert issue_check(sentence_issues("One. Two.", 4, 6)[0]) == "sentences"
    assert issue_check("generation failed: timeout") == "generation_error"
    assert issue_check("mentions 'dog', which is not in the scene graph") == "objects"
    assert issue_check("uses a forbidden word ('image')") == "wording"
    assert issue_check("something new") == "other"


def test_attempts_count_only_inside_an_active_level() -> None:
    metrics = PipelineMetrics()
    record_llm_attempt(True, [])  # no active level: nowhere to count, and no error
    with metrics.active(4):
        record_llm_attempt(False, [ISSUE_EMPTY, ISSUE_ENDING, ISSUE_ENDING])
    assert metrics.llm_counts_for(4) == {"llm_attempts": {"failed": 1},
                                         "verify_failures": {"empty": 1, "ending": 1}}
    assert metrics.llm_counts_for(3) == {"llm_attempts": {}, "verify_failures": {}}


def test_the_verify_loop_counts_every_attempt() -> None:
    """Item 0 passes at once; item 1 fails twice (no ending, then empty) and passes third time."""
    answers = {(0, 1): "A fine answer.", (1, 1): "cut mid", (1, 2): "", (1, 3): "Now done."}

    def prompt(i: int, issues: list[str] | None) -> ChatPrompt:
        return ChatPrompt(messages=[{"role": "user", "content": str(i)}])

    def generate(prompts: list[ChatPrompt], attempt: int) -> list[Generation]:
        return [Generation(text=answers[(int(p.messages[0]["content"]), attempt)], finish_reason="stop") for p in prompts]

    metrics = PipelineMetrics()
    with metrics.active(3):
        outcomes = run_verified(2, prompt, generate, lambda items, gens: [ending_issues(g.text) for g in gens], max_attempts=3)
    assert [len(o.attempts) for o in outcomes] == [1, 3] and all(o.verified for o in outcomes)
    assert metrics.llm_counts_for(3) == {"llm_attempts": {"failed": 2, "passed": 2},
                                         "verify_failures": {"empty": 1, "ending": 1}}


def test_eta_inputs_are_exported() -> None:
    assert {"shards_planned", "shards_committed", "llm_attempts", "verify_failures"} <= set(METRIC_NAMES)
