"""Checks of a Level-3 dense caption.

The paper's verification asks the LLM (chain of thought) for a checklist of the objects a caption
mentions and flags the caption when one of them is absent from the scene graph. The checklist is
parsed here and matched against the names the scene graph mentions with the shared word
normalisation of :mod:`levels.text` and word containment either way ("red car" ~ "car", "table" ~
"dining table"). Local checks (clean ending, sentence count, meta-language, repetition) need no
model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from levels.text import content_words, repetition_issues
from levels.verify import Issue, compile_patterns, ending_issues, sentence_issues, wording_issues

#: Caption length the prompt asks for.
MIN_SENTENCES, MAX_SENTENCES = 2, 4

#: Wording that betrays the structured input; the reference's captions leaked such phrases.
META_PATTERNS = compile_patterns(
    (
        r"\bscene[ -]?graph",
        r"\brelationships? (?:indicates?|shows?|suggests?)",
        r"\bno relations? (?:are )?specified",
        r"\bthe layers?\b",
        r"\bgroups? \d",
        r"\bdepth layers?",
        r"\bin[- ]context",
        r"\bas an ai\b",
        r"\bprevious answer\b",  # the regeneration prompt echoed back
        r"\bhad these problems\b",
        r"\b(?:the|this) summary\b",
    )
)

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*(.+?)\s*$")


def _contained(inner: list[frozenset[str]], outer: list[frozenset[str]]) -> bool:
    return bool(inner) and all(any(w & o for o in outer) for w in inner)


def names_match(mentioned: str, name: str) -> bool:
    """Whether a checklist entry and a scene-graph name refer to the same thing (either contains the other)."""
    a, b = content_words(mentioned), content_words(name)
    return _contained(a, b) or _contained(b, a)


def parse_checklist(text: str, complete: bool = True) -> list[str]:
    """Entries of a "- object" list; when the answer was cut off its last line is dropped."""
    lines = text.splitlines()
    if not complete and lines:
        lines = lines[:-1]
    entries = []
    for line in lines:
        match = _BULLET.match(line)
        if match:
            entries.append(match.group(1).strip().strip(".,;:\"'"))
    return [e for e in entries if e]


def object_issues(mentioned: Iterable[str], scene_objects: Iterable[str]) -> list[Issue]:
    """One problem per checklist entry that matches no scene-graph name."""
    names = list(scene_objects)
    issues, seen = [], set()
    for entry in mentioned:
        key = entry.lower()
        if key in seen or not content_words(entry):
            continue
        seen.add(key)
        if not any(names_match(entry, name) for name in names):
            issues.append(Issue("objects", f"mentions '{entry}', which is not in the scene graph"))
    return issues


def caption_issues(caption: str) -> list[Issue]:
    """Problems a caption shows on its own: ending, length, meta-language, repetition."""
    return (
        ending_issues(caption)
        + sentence_issues(caption, MIN_SENTENCES, MAX_SENTENCES)
        + wording_issues(caption, META_PATTERNS, "talks about the input instead of the photo")
        + repetition_issues(caption)
    )
