"""Is an additional-context paragraph about the photo? The ``relevance`` check of Level 4.

A context passes when it names the landmark or at least one object or tag of its image: by lemma
first (the shared normalisation of :mod:`levels.text`: "cats" names "egyptian cat"), and, for the
paragraphs that name none that way, by synonym through the text embedder: a context word whose
cosine to a scene name reaches ``level4.relevance_similarity`` ("kitten" for "cat") counts. A
small LLM that drifts into a stock paragraph ("Cycling is the most popular form of exercise..."
for a cat) names nothing of either kind and is regenerated.

Without a text embedder the check is lemma-only; the stage says so in the rows' provenance.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.models.roles import TextEmbedder
from levels.scene_text import landmark_names
from levels.text import content_tokens, mentioned_names
from levels.verify import Issue

logger = logging.getLogger(__name__)

#: Scene names quoted in the problem, so that the regeneration prompt can point at the theme.
SHOWN_NAMES = 4

#: Words too common to say what a paragraph is about; they are never embedded.
_FUNCTION_WORDS = frozenset(
    "and or but nor so yet for with without from into onto over under about above below after "
    "before during since until while because although though if then than as at by in on off to "
    "up down out is are was were be been being am has have had having do does did done can could "
    "may might must shall should will would it they them we us you he she him i me my our your "
    "who whom whose which what when where why how all any both each every more most other such "
    "no not only own same too very just also often usually many much even still well there here "
    "one ones made make makes used use uses way ways thing things kind kinds part parts first new".split()
)
_AND = re.compile(r"\s+and\s+")


@dataclass(frozen=True)
class SceneTerms:
    """What a context may name: object labels and tags (matched by their head word) and the
    landmark's names (matched whole: "living space" needs both words)."""

    things: tuple[str, ...]
    places: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.things + self.places

    @property
    def synonym_targets(self) -> tuple[str, ...]:
        """The names and their head words: "kittens" is 0.54 from "egyptian cat" but 0.65 from
        "cat" (MiniLM), so the head alone is what a synonym is compared with too."""
        heads = [tokens[-1] for tokens in map(content_tokens, self.names) if tokens]
        return tuple(dict.fromkeys([*self.names, *heads]))

    def shown(self) -> str:
        return ", ".join(self.names[:SHOWN_NAMES])


def scene_terms(fields: dict[str, Any]) -> SceneTerms:
    """The scene names of one record: object and floating-object labels, tag names, and the
    landmark's category and fine category split at "and" ("port", "harbor")."""
    things: dict[str, None] = {}
    for key in ("objects", "floating_objects"):
        for obj in fields.get(key) or []:
            label = str(obj.get("label") or (obj.get("labels") or [""])[0]).replace("_", " ").strip()
            if label:
                things[label.lower()] = None
    for tag in fields.get("tags") or []:
        name = str(tag.get("name") or "").replace("_", " ").strip().lower()
        if name:
            things[name] = None
    places = {part: None for name in landmark_names(fields.get("landmark")) for part in _AND.split(name) if part}
    return SceneTerms(tuple(things), tuple(places))


def off_topic(terms: SceneTerms) -> Issue:
    return Issue(
        "relevance",
        f"is not about the photo: it names none of its items or its place ({terms.shown()})",
    )


def relevance_issues(
    texts: Sequence[str],
    terms: Sequence[SceneTerms],
    embedder: TextEmbedder | None,
    threshold: float,
) -> list[list[Issue]]:
    """A ``relevance`` problem per text that names none of its scene's terms. Texts the lemmas
    settle cost nothing; the rest share ONE embedder call over their distinct words and names."""
    found: list[list[Issue]] = [[] for _ in texts]
    unsettled = [
        k for k, (text, scene) in enumerate(zip(texts, terms, strict=True))
        if scene.names and not mentioned_names(text, scene.things, scene.places)
    ]  # fmt: skip
    if not unsettled:
        return found
    if embedder is None:
        for k in unsettled:
            found[k] = [off_topic(terms[k])]
        return found
    words = {k: _candidate_words(texts[k]) for k in unsettled}
    vocabulary = sorted(set().union(*words.values(), *(terms[k].synonym_targets for k in unsettled)))
    vectors = dict(zip(vocabulary, embedder.embed(vocabulary), strict=True))
    for k in unsettled:
        best = _best_pair(words[k], terms[k].synonym_targets, vectors)
        if best is not None and best[2] >= threshold:
            logger.debug("relevance by synonym: %r ~ %r (%.2f)", *best)
        else:
            found[k] = [off_topic(terms[k])]
    return found


def _candidate_words(text: str) -> list[str]:
    return sorted({w for w in content_tokens(text) if len(w) > 2 and not w.isdigit() and w not in _FUNCTION_WORDS})


def _best_pair(
    words: list[str], names: Sequence[str], vectors: dict[str, np.ndarray]
) -> tuple[str, str, float] | None:
    """(context word, scene name, cosine) of the closest pair; embeddings are unit vectors."""
    if not words or not names:
        return None
    sims = np.stack([vectors[w] for w in words]) @ np.stack([vectors[n] for n in names]).T  # (W, N)
    i, j = (int(v) for v in np.unravel_index(int(np.argmax(sims)), sims.shape))
    return words[i], names[j], float(sims[i, j])
