"""Text normalisation and the content checks that Levels 3 and 4 share (pure, no model).

Levels never import each other, so what both need lives here: the light, dependency-free word
normalisation (lower case, articles and counts dropped, plural endings stripped, irregular plurals
and person words mapped), the repetition check, and finding which scene names a text mentions by
lemma. The model-backed half of relevance (synonyms through the text embedder) is Level 4's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

from levels.verify import Issue, split_sentences

_WORD = re.compile(r"[a-z0-9]+")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

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


def content_tokens(text: str) -> list[str]:
    """The content words of ``text`` as written (lower case; "_" in labels is a space)."""
    return [w for w in _WORD.findall(text.lower().replace("_", " ")) if w not in _STOPWORDS]


def content_words(text: str) -> list[frozenset[str]]:
    """The forms of each content word of ``text``."""
    return [word_forms(w) for w in content_tokens(text)]


# ----------------------------------------------------------------------------- repetition


@dataclass(frozen=True)
class RepetitionBounds:
    """What counts as a repetition loop. The defaults flag none of the demo's dense captions, the
    prompts' examples or the tests' texts, and catch the loops small LLMs fall into ("fine fine
    fine", a sentence written twice, one phrase over and over)."""

    max_run: int = 2
    """The same word at most this often in a row ("had had" is English; a third is a loop)."""
    ngram: int = 4
    max_ngram: int = 2
    """Any ``ngram`` words in a row at most this often ("the cat sat on" a third time is a loop;
    three-word stock phrases such as "one of the" recur in honest prose)."""
    min_words: int = 40
    min_distinct: float = 0.35
    """Texts of ``min_words`` or more need this share of distinct words (prose has over 0.5)."""


def repetition_issues(text: str, bounds: RepetitionBounds = RepetitionBounds()) -> list[Issue]:
    """At most one ``repetition`` problem, naming the first loop found (runs, then repeated
    sentences, then repeated n-grams, then a small vocabulary)."""
    words = _TOKEN.findall(text.lower())
    for word, group in groupby(words):
        run = sum(1 for _ in group)
        if run > bounds.max_run:
            return [Issue("repetition", f"repeats '{word}' {run} times in a row")]
    seen: set[tuple[str, ...]] = set()
    for sentence in split_sentences(text):
        key = tuple(_TOKEN.findall(sentence.lower()))
        if len(key) >= bounds.ngram and key in seen:
            return [Issue("repetition", f"repeats the sentence '{sentence.strip()}'")]
        seen.add(key)
    grams = Counter(zip(*(words[k:] for k in range(bounds.ngram)), strict=False))
    if grams:
        gram, count = grams.most_common(1)[0]
        if count > bounds.max_ngram:
            return [Issue("repetition", f"repeats '{' '.join(gram)}' {count} times")]
    if len(words) >= bounds.min_words and len(set(words)) / len(words) < bounds.min_distinct:
        share = len(set(words)) / len(words)
        return [Issue("repetition", f"uses few different words ({share:.0%} of {len(words)} are distinct)")]
    return []


# ----------------------------------------------------------------------------- relevance by lemma


def head_word(name: str) -> frozenset[str]:
    """The forms of a name's last content word ("egyptian cat" -> cat): what a text about the
    thing is most likely to say. Empty when the name has no content word."""
    words = content_words(name)
    return words[-1] if words else frozenset()


def mentioned_names(text: str, heads: Iterable[str], wholes: Iterable[str] = ()) -> list[str]:
    """The names ``text`` mentions: a name of ``heads`` by its head word, a name of ``wholes``
    (multi-word places such as "living space", whose head alone is too common a word) only with
    all of its content words. Plural and irregular forms match their singular."""
    forms = set().union(*content_words(text)) if text.strip() else set()
    found = [name for name in heads if head_word(name) & forms]
    for name in wholes:
        words = content_words(name)
        if words and all(w & forms for w in words):
            found.append(name)
    return found
