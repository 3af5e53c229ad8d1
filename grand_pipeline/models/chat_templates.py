"""Conversation templates: how a ``ChatPrompt``'s messages become the one text an LLM reads.

Why this exists: ``lmsys/vicuna-13b-v1.5``, the paper's LLM, ships no chat template in its
tokenizer config (vllm#17977, transformers#33246), and ``apply_chat_template`` raises without one.
Every prompt then failed to template and every row came out with an empty caption. So the format
is chosen here, by name, from ``models.llm.options.chat_template``:

- ``auto`` (the default): the tokenizer's own template when it has one, else ``vicuna_v1.1``.
- ``model``: the tokenizer's own template; a tokenizer without one is a configuration error.
- ``vicuna_v1.1``, ``llama-2``, ``chatml``: written here after FastChat's definitions
  (lm-sys/FastChat ``fastchat/conversation.py``: ``register_conv_template`` entries
  ``vicuna_v1.1`` = ``SeparatorStyle.ADD_COLON_TWO`` with ``sep=" "``, ``sep2="</s>"``;
  ``llama-2`` = ``SeparatorStyle.LLAMA2`` with ``sep=" "``, ``sep2=" </s><s>"``; and the
  ``SeparatorStyle.CHATML`` layout; rendered as ``Conversation.get_prompt`` does).

Rules shared by the three written templates:

- A leading ``system`` message replaces the template's default system prompt, as FastChat's
  ``set_system_message`` (and its OpenAI server) does; without one the default is used.
- The remaining turns alternate user / assistant, starting with the user. Anything else raises
  ``ValueError``, which ``llm_common.admit`` turns into that prompt's error Generation.
- A final assistant message is an opener: its turn is left open so the model continues it
  (``prompts.base.PromptTemplate.answer_prefix``); otherwise the text ends with the assistant
  header.
- The text holds no beginning-of-sequence token: the tokenizer adds its usual one when the text
  is tokenised (see ``llm_common.PromptFormat``), as FastChat's ``tokenizer(prompt)`` does. A
  tokenizer's own template writes its special tokens itself (``writes_special_tokens``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grand_pipeline.models.weights import ModelSourceError
from grand_pipeline.registry import Registry

logger = logging.getLogger(__name__)

Message = dict[str, str]

#: FastChat's ``vicuna_v1.1`` system message, used when a prompt brings none.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

#: The default of ``models.llm.options.chat_template``.
DEFAULT = "auto"


class ChatTemplate:
    """Renders a list of chat messages to text, ending where the model should write."""

    name: str = ""
    writes_special_tokens: bool = False
    """True when the text already holds the tokenizer's leading special tokens (BOS)."""

    def render(self, messages: Sequence[Message]) -> str:
        raise NotImplementedError


def continues(messages: Sequence[Message]) -> bool:
    """True when the last message is a started assistant answer (an opener) to be continued."""
    return bool(messages) and messages[-1].get("role") == "assistant"


def split_turns(messages: Sequence[Message], template: str) -> tuple[str | None, list[Message]]:
    """(system text or None, the user/assistant turns), checking that the turns alternate."""
    turns = list(messages)
    system = None
    if turns and turns[0].get("role") == "system":
        system = str(turns.pop(0).get("content", ""))
    if not turns:
        raise ValueError(f"{template}: a prompt needs at least one user message")
    for k, message in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(
                f"{template}: message {k + (system is not None)} is {message.get('role')!r}; "
                f"turns after the system message must alternate user/assistant from the user"
            )
    return system, turns


@dataclass(frozen=True)
class VicunaV11(ChatTemplate):
    """``SYS USER: q ASSISTANT: a</s>USER: q ASSISTANT:`` (FastChat ``ADD_COLON_TWO``)."""

    name: str = "vicuna_v1.1"
    default_system: str = VICUNA_SYSTEM

    def render(self, messages: Sequence[Message]) -> str:
        system, turns = split_turns(messages, self.name)
        # get_prompt: system + sep, then "ROLE: message" + (sep after a user turn, sep2 after an
        # assistant turn), and a bare "ASSISTANT:" for the turn the model is to write.
        text = (self.default_system if system is None else system) + " "
        for k, message in enumerate(turns):
            role, content = ("USER", " ") if k % 2 == 0 else ("ASSISTANT", "</s>")
            last_opener = k == len(turns) - 1 and role == "ASSISTANT"
            text += f"{role}: {message.get('content', '')}" + ("" if last_opener else content)
        return text if continues(turns) else text + "ASSISTANT:"


@dataclass(frozen=True)
class Llama2(ChatTemplate):
    """``[INST] <<SYS>>\\nSYS\\n<</SYS>>\\n\\nq [/INST] a </s><s>[INST] q [/INST]`` (FastChat ``LLAMA2``)."""

    name: str = "llama-2"

    def render(self, messages: Sequence[Message]) -> str:
        system, turns = split_turns(messages, self.name)
        # No system message: FastChat starts with a bare "[INST] " (no empty <<SYS>> block).
        text = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n" if system else "[INST] "
        for k, message in enumerate(turns):
            content = message.get("content", "")
            if k == 0:
                text += content + " "
            elif k % 2 == 0:
                text += f"[INST] {content} "
            elif k == len(turns) - 1:  # an opener: the answer stays open
                text += f"[/INST] {content}"
            else:
                text += f"[/INST] {content} </s><s>"
        return text if continues(turns) else text + "[/INST]"


@dataclass(frozen=True)
class ChatML(ChatTemplate):
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``."""

    name: str = "chatml"

    def render(self, messages: Sequence[Message]) -> str:
        system, turns = split_turns(messages, self.name)
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for k, message in enumerate(turns):
            content = message.get("content", "")
            if k == len(turns) - 1 and k % 2 == 1:  # an opener: no <|im_end|>
                text += f"<|im_start|>assistant\n{content}"
            else:
                text += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
        return text if continues(turns) else text + "<|im_start|>assistant\n"


@dataclass(frozen=True, eq=False)
class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own (Jinja) chat template, through ``apply_chat_template``."""

    tokenizer: Any = None
    name: str = "model"
    writes_special_tokens: bool = True

    def render(self, messages: Sequence[Message]) -> str:
        if continues(messages):
            # Leave the assistant turn open instead of closing it and opening a new one.
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=False, continue_final_message=True, tokenize=False
            )
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


VICUNA_V1_1 = VicunaV11()
LLAMA_2 = Llama2()
CHATML = ChatML()

TemplateFactory = Callable[[Any], ChatTemplate]
"""tokenizer (or None when the backend has none) -> the template to render with."""

#: Every name ``models.llm.options.chat_template`` accepts (the openai backend adds ``server``).
CHAT_TEMPLATES: Registry[TemplateFactory] = Registry("chat template")


def has_own_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@CHAT_TEMPLATES.register("auto")
def _auto(tokenizer: Any) -> ChatTemplate:
    if has_own_template(tokenizer):
        return TokenizerTemplate(tokenizer)
    logger.info("the tokenizer has no chat template: prompts use the vicuna_v1.1 conversation format")
    return VICUNA_V1_1


@CHAT_TEMPLATES.register("model")
def _model(tokenizer: Any) -> ChatTemplate:
    if not has_own_template(tokenizer):
        raise ModelSourceError(
            "chat_template 'model': the LLM's tokenizer has no chat template; set "
            f"models.llm.options.chat_template to one of {', '.join(CHAT_TEMPLATES.names())}"
        )
    return TokenizerTemplate(tokenizer)


CHAT_TEMPLATES.register("vicuna_v1.1")(lambda tokenizer: VICUNA_V1_1)
CHAT_TEMPLATES.register("llama-2")(lambda tokenizer: LLAMA_2)
CHAT_TEMPLATES.register("chatml")(lambda tokenizer: CHATML)


def resolve(name: str | None, tokenizer: Any) -> ChatTemplate:
    """The template ``name`` stands for with this tokenizer; unknown names list the known ones."""
    template = CHAT_TEMPLATES.get(str(name or DEFAULT))(tokenizer)
    logger.debug("chat template %r resolved to %s", name or DEFAULT, template.name)
    return template
