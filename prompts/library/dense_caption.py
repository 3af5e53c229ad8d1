"""Level-3 prompts: the dense caption, its chain-of-thought object check and its regeneration.

Structure after Fig. 6 (a) of the GLaMM paper (format explanation, two in-context examples, then
the instruction), in our own words. The regeneration prompt repeats the task with the same system
turn and examples and adds the verifier's findings, so the model sees what to fix. The examples
file carries an ``issues`` value per example for that reason; ``dense_caption`` ignores it.
"""

from __future__ import annotations

from prompts.base import PromptTemplate, register, with_prefix

CAPTION_SYSTEM = """\
You write captions for photos from their scene graph. A scene graph lists the things in one \
photo, nearest first, in depth layers ("Immediate foreground", "Foreground", "Midground", \
"Background"). Things close to each other share a numbered group, and each thing is written as \
name/description. Short captions by other captioners, phrases that refer to things, and the kind \
of place follow. Write 2 to 4 simple sentences, as if you were looking at the photo. Call each \
thing by its name from the scene graph, and never add things it does not list."""

CAPTION_TASK = "Scene graph:\n{scene_graph}"

REGENERATE_TASK = (
    CAPTION_TASK
    + """

A previous caption had these problems: {issues}. Write a new caption without them."""
)

#: Version 2: a shorter system turn and in-context examples the size of real scene graphs. With
#: version 1 the 135M lite model copied whole sentences (and their objects) from the examples.
DENSE_CAPTION = register(
    PromptTemplate(
        name="dense_caption",
        version="2",
        system=CAPTION_SYSTEM,
        user_template=CAPTION_TASK,
        examples_file="dense_caption.json",
        max_new_tokens=200,
    )
)

DENSE_CAPTION_REGENERATE = register(
    PromptTemplate(
        name="dense_caption_regenerate",
        version="2",
        system=CAPTION_SYSTEM,
        user_template=REGENERATE_TASK,
        examples_file="dense_caption.json",
        max_new_tokens=200,
    )
)

#: The same prompts with the answer started by the most confident thing of the graph
#: (``level3.opener``): "A person", then the model goes on. A small model asked to "name the
#: things" still drifts to whatever its examples showed; a started sentence keeps it on the photo.
OPENER = "{lead}"
DENSE_CAPTION_OPENER = with_prefix(DENSE_CAPTION, "dense_caption_opener", OPENER)
DENSE_CAPTION_REGENERATE_OPENER = with_prefix(
    DENSE_CAPTION_REGENERATE, "dense_caption_regenerate_opener", OPENER
)

DENSE_CAPTION_VERIFY = register(
    PromptTemplate(
        name="dense_caption_verify",
        version="1",
        system=(
            "You check photo captions. You read a caption and write down, step by step, every "
            "physical object it says is in the photo: things, people, animals, plants, vehicles, "
            "food, furniture and parts of buildings. Use the caption's own words for each one, keep "
            "a describing word when the caption has one, and skip colours on their own, actions, "
            "places and the photo itself."
        ),
        user_template=(
            "Caption: {caption}\n\n"
            "List every physical object the caption mentions, one per line, as '- object'. "
            "Reply with the list only."
        ),
        examples_file="dense_caption_verify.json",
        max_new_tokens=160,
    )
)
