"""Golden tests of every registered prompt: a wording change must show up as a diff and a new version.

Goldens live in ``tests/golden/<name>.txt``; ``GRAND_UPDATE_GOLDEN=1 pytest tests/test_prompts.py``
rewrites them (then read the diff, and bump the prompt's version if its wording changed).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

from grand_pipeline.models.roles import ChatPrompt
from prompts.base import PROMPTS, PromptTemplate, get_prompt

GOLDEN = Path(__file__).parent / "golden"

SCENE_GRAPH = """\
Immediate foreground:
Group 1: cup/white ceramic cup, saucer
Foreground:
Group 2: table/wooden table
Short captions:
- a cup of coffee on a table
Relationships:
- a cup on a saucer -> cup (group 1), saucer (group 1)
Landmark: Indoor, Living space"""

#: Fixed field values; a field not listed here renders as ``<field>``.
FIELDS = {
    "scene_graph": SCENE_GRAPH,
    "caption": "A white cup sits on a saucer. The saucer rests on a wooden table.",
    "issues": "mentions 'dragon', which is not in the scene graph; has 1 sentences; it needs 2 to 4",
    "tags": "cup, saucer, table",
    "objects": "cup, saucer, table",
    "lead": "A cup",
}
OTHER_FIELDS = {
    "scene_graph": "Background:\nGroup 1: mountain/snowy mountain\nLandmark: Outdoor, Natural landscape",
    "caption": "A snowy mountain rises behind a lake. Clouds hang over its peak.",
    "issues": "has 6 sentences; it needs 2 to 4",
    "tags": "mountain, lake",
    "objects": "mountain, lake",
    "lead": "A mountain",
}


def all_prompts() -> list[str]:
    get_prompt("dense_caption")  # imports prompts.library, which registers every prompt
    return PROMPTS.names()


def placeholders(template: PromptTemplate) -> list[str]:
    texts = (template.user_template, template.answer_prefix)
    return list(dict.fromkeys(name for t in texts for _, name, _, _ in string.Formatter().parse(t) if name))


def render(template: PromptTemplate, values: dict[str, str]) -> ChatPrompt:
    return template.render(**{name: values.get(name, f"<{name}>") for name in placeholders(template)})


def dump(prompt: ChatPrompt) -> str:
    """A readable, diffable text form of a rendered prompt."""
    parts = [f"prefix_key: {prompt.prefix_key}", f"max_new_tokens: {prompt.max_new_tokens}"]
    for message in prompt.messages:
        parts.append(f"=== {message['role']} ===\n{message['content']}")
    return "\n\n".join(parts) + "\n"


def check_golden(name: str, text: str) -> None:
    """Compare with the golden; write it instead when ``GRAND_UPDATE_GOLDEN=1``."""
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("GRAND_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"no golden {path}; run GRAND_UPDATE_GOLDEN=1 pytest {__file__} and review it")
    assert text == path.read_text(), f"prompt {name!r} changed; update the golden and bump its version"


@pytest.mark.parametrize("name", all_prompts())
def test_prompt_matches_golden(name: str) -> None:
    check_golden(name, dump(render(get_prompt(name), FIELDS)))


@pytest.mark.parametrize("name", all_prompts())
def test_prompt_has_version_and_a_shared_prefix(name: str) -> None:
    template = get_prompt(name)
    assert template.version.strip()
    one, two = render(template, FIELDS), render(template, OTHER_FIELDS)
    # Everything but the last user turn is the same for every image: that is the prefix that
    # batching and prefix caching share, and prefix_key names it.
    assert one.prefix_key == two.prefix_key == f"{name}@{template.version}"
    # An opener is per image too: it is the started assistant turn after the last user turn.
    tail = 2 if template.answer_prefix else 1
    assert one.messages[:-tail] == two.messages[:-tail]
    assert one.messages[-tail] != two.messages[-tail]
    assert one.messages[-tail]["role"] == "user"


OWN_PROMPTS = (
    "dense_caption",
    "dense_caption_verify",
    "dense_caption_regenerate",
    "additional_context",
    "additional_context_regenerate",
)


@pytest.mark.parametrize("name", OWN_PROMPTS)
def test_own_prompts_render_their_examples_completely(name: str) -> None:
    template = get_prompt(name)
    assert set(placeholders(template)) <= set(FIELDS)
    prompt = render(template, FIELDS)
    roles = [m["role"] for m in prompt.messages]
    # system, then (user, assistant) per in-context example, then the question.
    assert roles[0] == "system" and roles[-1] == "user" and len(roles) >= 4
    assert roles[1:-1] == ["user", "assistant"] * ((len(roles) - 2) // 2)
    for message in prompt.messages:
        assert "{" not in message["content"].replace(SCENE_GRAPH, "")


def test_regenerate_prompts_share_the_first_prompts_instructions() -> None:
    for first, again in (
        ("dense_caption", "dense_caption_regenerate"),
        ("additional_context", "additional_context_regenerate"),
    ):
        one, two = render(get_prompt(first), FIELDS), render(get_prompt(again), FIELDS)
        assert one.messages[0] == two.messages[0]
        assert two.messages[-1]["content"].startswith(one.messages[-1]["content"])
        assert FIELDS["issues"] in two.messages[-1]["content"]
        # Same examples, same answers: only the instruction text grows.
        assert [m["content"] for m in one.messages if m["role"] == "assistant"] == [
            m["content"] for m in two.messages if m["role"] == "assistant"
        ]


def test_opener_prompts_start_the_answer_and_are_continued() -> None:
    """The opener variants end with a started assistant turn holding the lead, which the chat
    template keeps open, and ``join_answer`` puts the lead back in front of the continuation."""
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (only to prove transformers is there)

    from grand_pipeline.models import llm_common
    from prompts.base import join_answer

    for name in ("dense_caption_opener", "dense_caption_regenerate_opener"):
        template = get_prompt(name)
        prompt = render(template, FIELDS)
        assert prompt.messages[-1] == {"role": "assistant", "content": "A cup"}
        assert template.prefix_of(prompt) == "A cup"
        assert llm_common.continues_answer(prompt)
        assert get_prompt(name.replace("_opener", "")).prefix_of(prompt) == ""
    assert join_answer("A cup", " sits on a saucer.") == "A cup sits on a saucer."
    assert join_answer("A cup", ", white, sits there.") == "A cup, white, sits there."
    assert join_answer("", "Plain.") == "Plain."
