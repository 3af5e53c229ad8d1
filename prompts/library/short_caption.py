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
        version="2",
        system=(
            "You write captions for photos you cannot see. You are given the image-level tags and the "
            "objects a detector found in one photo. Write one short sentence describing the photo, "
            "using only the listed objects and tags. Do not add objects, people, colours, counts or "
            "places that are not listed. Answer with the sentence only."
        ),
        user_template="Tags: {tags}\nObjects: {objects}\nCaption:",
        # Two worked examples: without them the 135M lite model answers with chatter, not captions.
        examples_file="short_caption.json",
        max_new_tokens=48,
    )
)
