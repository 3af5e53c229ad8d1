"""The conversation-template registry and ``llm_common.PromptFormat``.

Goldens in ``tests/golden/chat_template_<name>.txt`` hold each written template's rendering of a
real prompt (``short_caption``: system turn, two in-context examples, the question) and of an
opener; ``GRAND_UPDATE_GOLDEN=1`` rewrites them, as for the prompt goldens. The tokenizers are the
offline word-level tiny ones of ``hf_common``: no download, and no chat template of their own.
"""

from __future__ import annotations

import pytest

from grand_pipeline.models import chat_templates, llm_common
from grand_pipeline.models.hf_common import tiny_tokenizer
from grand_pipeline.models.roles import ChatPrompt
from grand_pipeline.models.weights import ModelSourceError
from grand_pipeline.registry import UnknownNameError
from prompts.base import get_prompt
from tests.test_prompts import FIELDS, check_golden, render

WRITTEN = ("vicuna_v1.1", "llama-2", "chatml")

OPENER = ChatPrompt(
    messages=[
        {"role": "system", "content": "You write captions."},
        {"role": "user", "content": "Scene graph: cup, saucer"},
        {"role": "assistant", "content": "A cup"},
    ]
)

#: A Jinja template of the kind tokenizers ship (this one is ChatML-like with a marker).
OWN_TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}<</{{ m['role'] }}>>{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)


def golden_text(fmt: llm_common.PromptFormat) -> str:
    caption = render(get_prompt("short_caption"), FIELDS)
    return f"=== short_caption ===\n{fmt.text(caption)}\n=== opener ===\n{fmt.text(OPENER)}\n"


@pytest.mark.parametrize("name", WRITTEN)
def test_written_templates_match_their_goldens(name: str) -> None:
    fmt = llm_common.PromptFormat.build(tiny_tokenizer(), name)
    assert fmt.name == name
    check_golden(f"chat_template_{name}", golden_text(fmt))


def test_a_tokenizer_without_a_chat_template_renders_vicuna_v1_1() -> None:
    """The paper's case: Vicuna-13B-v1.5 ships no template, ``auto`` falls back to its format."""
    tokenizer = tiny_tokenizer()
    assert tokenizer.chat_template is None
    fmt = llm_common.PromptFormat.build(tokenizer, None)
    assert fmt.name == "vicuna_v1.1" and fmt.template is chat_templates.VICUNA_V1_1
    check_golden("chat_template_vicuna_v1.1", golden_text(fmt))


def test_vicuna_v1_1_is_fastchats_layout() -> None:
    """FastChat ``vicuna_v1.1``: system + " ", "USER: q ", "ASSISTANT: a</s>", then "ASSISTANT:"."""
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "How are you?"},
    ]
    assert chat_templates.VICUNA_V1_1.render(messages) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: Hello! ASSISTANT: Hi.</s>USER: How are you? ASSISTANT:"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages[:1]]
    assert chat_templates.VICUNA_V1_1.render(with_system) == "Be brief. USER: Hello! ASSISTANT:"
    assert chat_templates.VICUNA_V1_1.render(OPENER.messages).endswith("ASSISTANT: A cup")


def test_llama_2_and_chatml_single_turn() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert chat_templates.LLAMA_2.render(messages) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]"
    assert chat_templates.LLAMA_2.render(messages[1:]) == "[INST] U [/INST]"
    assert chat_templates.CHATML.render(messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


def test_registry_names_and_unknown_names_list_the_known_ones() -> None:
    assert chat_templates.CHAT_TEMPLATES.names() == ["auto", "chatml", "llama-2", "model", "vicuna_v1.1"]
    with pytest.raises(UnknownNameError) as info:
        llm_common.PromptFormat.build(tiny_tokenizer(), "vicuna")
    assert str(info.value) == (
        "unknown chat template 'vicuna'; known: auto, chatml, llama-2, model, vicuna_v1.1"
    )


def test_the_models_own_template_wins_under_auto_and_model_needs_one() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = OWN_TEMPLATE
    prompt = ChatPrompt(messages=OPENER.messages[:2])
    for name in ("auto", "model"):
        fmt = llm_common.PromptFormat.build(tokenizer, name)
        assert fmt.name == "model" and fmt.prefix_ids == []  # the template writes its own specials
        assert fmt.text(prompt) == tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=False
        )
        assert fmt.text(prompt).endswith("<<assistant>>")
        assert fmt.text(OPENER).endswith("<<assistant>>A cup")  # the opener is left open
    # An explicit written template overrides the tokenizer's own.
    assert llm_common.PromptFormat.build(tokenizer, "chatml").name == "chatml"
    with pytest.raises(ModelSourceError, match="has no chat template"):
        llm_common.PromptFormat.build(tiny_tokenizer(), "model")


def test_token_ids_add_only_the_tokenizers_leading_specials() -> None:
    """Written templates leave BOS to the tokenizer (as FastChat's ``tokenizer(prompt)``), but a
    default trailing EOS would close the turn the model is to write, so it is never added."""
    prompt = ChatPrompt(messages=OPENER.messages[:2])
    plain, wrapping = tiny_tokenizer(), tiny_tokenizer(wrap=True)  # wrap: <s> text </s>
    assert llm_common.leading_special_ids(plain) == []
    assert llm_common.leading_special_ids(wrapping) == [wrapping.bos_token_id]
    fmt = llm_common.PromptFormat.build(wrapping, "vicuna_v1.1")
    ids = fmt.token_ids(prompt)
    text_ids = wrapping(fmt.text(prompt), add_special_tokens=False)["input_ids"]
    assert ids == [wrapping.bos_token_id, *text_ids] and ids[-1] != wrapping.eos_token_id
    assert llm_common.PromptFormat.build(plain, "vicuna_v1.1").token_ids(prompt) == text_ids


def test_malformed_conversations_fail_only_their_prompt() -> None:
    fmt = llm_common.PromptFormat.build(tiny_tokenizer(), "vicuna_v1.1")
    bad = ChatPrompt(messages=[{"role": "assistant", "content": "first"}])
    empty = ChatPrompt(messages=[{"role": "system", "content": "only a system turn"}])
    good = ChatPrompt(messages=OPENER.messages[:2])
    for template in (chat_templates.VICUNA_V1_1, chat_templates.LLAMA_2, chat_templates.CHATML):
        with pytest.raises(ValueError, match="alternate"):
            template.render(bad.messages)
        with pytest.raises(ValueError, match="at least one user message"):
            template.render(empty.messages)
    admitted = llm_common.admit([bad, good, empty], lambda p: len(fmt.token_ids(p)), 10_000)
    assert admitted.runnable == [1]
    assert admitted.pending.results[0].error.startswith("prompt could not be tokenised: vicuna_v1.1")
