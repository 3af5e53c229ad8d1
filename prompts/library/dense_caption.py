"""Level-3 prompts: the dense caption, its chain-of-thought object check and its regeneration.

Structure after Fig. 6 (a) of the GLaMM paper (format explanation, two in-context examples, then
the instruction), in our own words. The regeneration prompt repeats the task with the same system
turn and examples and adds the verifier's findings, so the model sees what to fix. The examples
file carries an ``issues`` value per example for that reason; ``dense_caption`` ignores it.
"""

from __future__ import annotations

from prompts.base import PromptTemplate, register

CAPTION_SYSTEM = """\
You write captions for photographs. Each request describes one photo with a scene graph, a \
structured summary of what the photo shows:

1. Depth layers: the things in the photo are sorted by their distance from the camera into up to \
four layers, "Immediate foreground", "Foreground", "Midground" and "Background".
2. Groups: inside a layer, things that are close to each other share a numbered group. Each entry \
is a name, sometimes followed by a slash and a short description, e.g. "cup/white ceramic cup".
3. Short captions: one-line descriptions of the whole photo by other captioners. They help with \
the overall setting but can be imprecise.
4. Relationships: phrases that connect things, followed by an arrow and the things they refer to.
5. Landmark: the broad kind of place and a finer category of it.

Describe only what the scene graph contains and never add things it does not list."""

CAPTION_TASK = """\
Scene graph of the photo:
{scene_graph}

Write a simple, natural caption of 2 to 4 sentences for this photo, as if you were looking at it \
yourself. Say what the main things are, where they are and what they are doing. Do not talk about \
the scene graph, its layers, groups or relationships, and do not explain anything: reply with the \
caption only."""

REGENERATE_TASK = (
    CAPTION_TASK
    + """

The previous caption had these problems: {issues}. Write a new caption that fixes them."""
)

DENSE_CAPTION = register(
    PromptTemplate(
        name="dense_caption",
        version="1",
        system=CAPTION_SYSTEM,
        user_template=CAPTION_TASK,
        examples_file="dense_caption.json",
        max_new_tokens=200,
    )
)

DENSE_CAPTION_REGENERATE = register(
    PromptTemplate(
        name="dense_caption_regenerate",
        version="1",
        system=CAPTION_SYSTEM,
        user_template=REGENERATE_TASK,
        examples_file="dense_caption.json",
        max_new_tokens=200,
    )
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
