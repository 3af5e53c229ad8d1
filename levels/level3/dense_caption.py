"""DenseCaptionStage: the LLM writes a dense caption from the scene graph; a verifier checks it.

The paper's verification, which the reference code never implemented: after each round of
captions, one batched chain-of-thought call lists the objects each caption mentions, and a caption
naming something the scene graph lacks (or failing a local check: clean ending, 2-4 sentences, no
meta-language, no repetition loop) is regenerated with its problems spelled out. See
:mod:`levels.verify`.

An image whose every answer failed to generate (no text at all) becomes an error row of this
stage naming the generation error; one whose model answered, however badly, keeps its best answer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import LLM, ChatPrompt, Generation
from grand_pipeline.schemas import LEVEL3_FIELDS
from grand_pipeline.stage import ImageRecord
from levels.level3.checks import caption_issues, object_issues, parse_checklist
from levels.verified_stage import VerifiedLLMStage
from levels.verify import GenerateFn, Issue, Outcome
from prompts.base import PromptTemplate, get_prompt, join_answer

DENSE_CAPTION: pa.DataType = next(f.type for f in LEVEL3_FIELDS if f.name == "dense_caption")


def skipped_caption() -> dict[str, Any]:
    """The value for an image with nothing to describe: no attempt, not verified."""
    return {"caption": "", "details": [], "verified": False, "attempts": []}


class DenseCaptionStage(VerifiedLLMStage):
    """Provides ``dense_caption`` {caption, details (filled by grounding), verified, attempts}."""

    name: ClassVar[str] = "dense_caption"
    requires: ClassVar[dict[str, str]] = {
        "scene_graph": "scene-graph text",
        "scene_objects": "names the scene graph mentions (in memory)",
        "scene_lead": "the caption opener, 'A <label>' (in memory)",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"dense_caption": DENSE_CAPTION}
    output: ClassVar[str] = "dense_caption"
    section: ClassVar[str] = "level3"
    nothing_to_say: ClassVar[str] = "empty scene graph, no dense caption"

    def __init__(self, cfg: Any, hub: Any) -> None:
        super().__init__(cfg, hub)
        suffix = "_opener" if cfg.level3.opener else ""
        self.first = get_prompt("dense_caption" + suffix)
        self.regenerate = get_prompt("dense_caption_regenerate" + suffix)
        self.checklist = get_prompt("dense_caption_verify")

    def prompt_fields(self, record: ImageRecord) -> dict[str, Any] | None:
        # An empty graph (no depth-bearing object, no caption, no landmark) gives the LLM nothing
        # to describe: the row keeps an empty, unverified caption instead of an invention.
        if not (record.fields["scene_graph"] or "").strip():
            return None
        return {"scene_graph": record.fields["scene_graph"], "lead": record.fields.get("scene_lead", "")}

    def empty_value(self) -> dict[str, Any]:
        return skipped_caption()

    def value(self, outcome: Outcome) -> dict[str, Any]:
        return {"caption": outcome.text, "details": [], "verified": outcome.verified, "attempts": outcome.attempts}

    def helper_prompts(self) -> list[PromptTemplate]:
        return [self.checklist]

    def generator(self, llm: LLM) -> GenerateFn:
        generate = super().generator(llm)

        def generate_whole(prompts: list[ChatPrompt], attempt: int) -> list[Generation]:
            """Answers with their opener put back in front: the model wrote only the rest."""
            gens = generate(prompts, attempt)
            for p, gen in zip(prompts, gens, strict=True):
                opener = self.first.prefix_of(p)  # the regeneration prompt has the same opener
                if opener and gen.finish_reason != "error":
                    gen.text = join_answer(opener, gen.text)
            return gens

        return generate_whole

    def check(self, records: list[ImageRecord], answers: list[Generation]) -> list[list[Issue]]:
        checklists = self.list_objects(self.backend("llm", LLM), [g.text.strip() for g in answers])
        found = []
        for record, gen, (entries, failure) in zip(records, answers, checklists, strict=True):
            issues = caption_issues(gen.text.strip())
            issues += [failure] if failure else object_issues(entries, record.fields["scene_objects"])
            found.append(issues)
        return found

    def list_objects(self, llm: LLM, captions: list[str]) -> list[tuple[list[str], Issue | None]]:
        """(checklist entries, why there is none) per caption, from one batched, greedy LLM call."""
        prompts = [self.checklist.render(caption=c) for c in captions]
        answers = llm.generate(prompts, temperature=0.0, seed=0)
        if len(answers) != len(prompts):
            raise ValueError(f"LLM returned {len(answers)} checklists for {len(prompts)} captions")
        return [_checklist(answer) for answer in answers]


def _checklist(answer: Generation) -> tuple[list[str], Issue | None]:
    """A failed checklist call leaves the caption unverifiable, which counts as a problem: a caption
    is only ``verified`` when its objects were actually checked. A cut-off list keeps its complete
    lines; an empty list means the caption names no object."""
    if answer.finish_reason == "error":
        return [], Issue("objects", f"its objects could not be checked ({answer.error or 'unknown error'})")
    return parse_checklist(answer.text, complete=answer.finish_reason == "stop"), None
