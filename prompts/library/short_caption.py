"""``short_caption``: one short sentence about a photo, written only from its tags and objects.

Used by the lite captioner (``llm_from_tags``), which stands in for BLIP-2/LLaVA when no offline
image captioner exists. The model never sees the pixels, so the prompt forbids anything that is
not in the two lists: a caption that invents objects would poison phrase grounding downstream.
"""

from __future__ import annotations

from prompts.base import PromptTemplate, register

SHORT_CAPTION = register(
    PromptTemplate(
        name="short_caption",
        version="3",
        # Version 3: a three-sentence system turn and no trailing "Caption:". The 135M lite model
        # answered version 2's longer instructions with chatter ("Boys, I'm so glad ...").
        system=(
            "You write short photo captions. Use only the objects and tags you are given. "
            "Answer with one sentence."
        ),
        user_template="Tags: {tags}\nObjects: {objects}",
        # Two worked examples: without them the 135M lite model answers with chatter, not captions.
        examples_file="short_caption.json",
        max_new_tokens=48,
    )
)
