"""Checks of a Level-3 dense caption.

The paper's verification asks the LLM (chain of thought) for a checklist of the objects a caption
mentions and flags the caption when one of them is absent from the scene graph. The checklist is
parsed here and matched against the names the scene graph mentions with a light, dependency-free
normalisation: lower case, articles and counts dropped, plural endings stripped, irregular plurals
and person words mapped, and word containment either way ("red car" ~ "car", "table" ~ "dining
table"). Local checks (clean ending, sentence count, meta-language) need no model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from levels.verify import compile_patterns, ending_issues, sentence_issues, wording_issues

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
        r"\b(?:the|this) summary\b",
    )
)

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*(.+?)\s*$")
_WORD = re.compile(r"[a-z0-9]+")

#: Words that carry no identity of an object.
_STOPWORDS = frozenset(
    "a an the some of one two three four five six seven eight nine ten several few many "
    "pair couple group its their his her this that these those".split()
)

#: Plurals that suffix stripping cannot undo, and person words: Level 1 folds man/woman/... into
#: "person", so a caption saying "a woman" must match a graph saying "person".
_IRREGULAR = {
    "people": "person", "men": "person", "man": "person", "women": "person", "woman": "person",
    "boy": "person", "boys": "person", "girl": "person", "girls": "person", "child": "person",
    "children": "person", "kid": "person", "kids": "person", "lady": "person", "ladies": "person",
    "persons": "person", "adult": "person", "adults": "person",
    "mice": "mouse", "feet": "foot", "teeth": "tooth", "geese": "goose", "knives": "knife",
    "leaves": "leaf", "shelves": "shelf", "loaves": "loaf", "wolves": "wolf", "calves": "calf",
}  # fmt: skip


def word_forms(word: str) -> frozenset[str]:
    """The forms a word may stand for: itself, its mapped form and its plural-stripped stems."""
    forms = {word, _IRREGULAR.get(word, word)}
    if word.endswith("ies") and len(word) > 4:
        forms.add(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.add(word[:-2])
    if word.endswith("s") and len(word) > 2:
        forms.add(word[:-1])
    return frozenset(forms)


def content_words(text: str) -> list[frozenset[str]]:
    """The forms of each content word of ``text``."""
    return [word_forms(w) for w in _WORD.findall(text.lower().replace("_", " ")) if w not in _STOPWORDS]


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


def object_issues(mentioned: Iterable[str], scene_objects: Iterable[str]) -> list[str]:
    """One problem per checklist entry that matches no scene-graph name."""
    names = list(scene_objects)
    issues, seen = [], set()
    for entry in mentioned:
        key = entry.lower()
        if key in seen or not content_words(entry):
            continue
        seen.add(key)
        if not any(names_match(entry, name) for name in names):
            issues.append(f"mentions '{entry}', which is not in the scene graph")
    return issues


def caption_issues(caption: str) -> list[str]:
    """Problems a caption shows on its own: ending, length, meta-language."""
    return (
        ending_issues(caption)
        + sentence_issues(caption, MIN_SENTENCES, MAX_SENTENCES)
        + wording_issues(caption, META_PATTERNS, "talks about the input instead of the photo")
    )
