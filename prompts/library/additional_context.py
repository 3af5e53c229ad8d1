"""Level-4 prompts: background knowledge about what a photo shows (uses, history, dangers).

Structure after Fig. 6 (b) of the GLaMM paper (two in-context examples, then the instruction),
in our own words. The answer must read as general knowledge, so the instruction forbids the words
the verifier rejects ("object", "scene", "scene graph"). The regeneration prompt repeats the task
with the verifier's findings; the examples file carries an ``issues`` value for it.
"""

from __future__ import annotations

from prompts.base import PromptTemplate, register

CONTEXT_SYSTEM = """\
You write short background notes to go with photographs. Each request lists the things visible \
in a photo (a name, sometimes followed by a slash and a short description) and the kind of place \
it shows. You explain the theme they suggest the way an encyclopedia or a guide would: what such \
things are usually used for, where they come from and how they developed, what dangers or safety \
rules go with them, and other facts worth knowing."""

CONTEXT_TASK = """\
Items: {scene_graph}

Write one paragraph of 5 to 7 sentences of background about the theme these items suggest: \
typical uses, history, possible dangers and other interesting facts. Do not describe the photo \
and do not use the words "object", "objects", "scene" or "scene graph". Reply with the paragraph \
only."""

ADDITIONAL_CONTEXT = register(
    PromptTemplate(
        name="additional_context",
        version="1",
        system=CONTEXT_SYSTEM,
        user_template=CONTEXT_TASK,
        examples_file="additional_context.json",
        max_new_tokens=320,
    )
)

ADDITIONAL_CONTEXT_REGENERATE = register(
    PromptTemplate(
        name="additional_context_regenerate",
        version="1",
        system=CONTEXT_SYSTEM,
        user_template=(
            CONTEXT_TASK
            + "\n\nThe previous answer had these problems: {issues}. Write a new answer that fixes them."
        ),
        examples_file="additional_context.json",
        max_new_tokens=320,
    )
)
