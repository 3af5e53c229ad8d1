"""Helpers shared by the transformers-based backends of the ``full`` profile.

- ``load_folder``: resolve ``spec.model`` to a local Hugging Face folder (hub snapshot, S3 copy,
  local path or tiny random weights) with ``weights.resolve``.
- ``shared``: one loaded model per :class:`~grand_pipeline.models.hub.ModelHub` and weights
  folder, so that e.g. the BLIP-2 captioner and the BLIP-2 region captioner of one actor hold a
  single copy on the GPU; the copy goes with the hub.
- ``load_pretrained`` / ``shared_pretrained``: a (model, processor) pair read from a local folder
  only, and the hub's one copy per device and dtype.
- ``save_pretrained``: a (model, processor) pair written into one folder, as the tiny builders do.
- ``tiny_tokenizer``: a small word-level tokenizer built offline with the ``tokenizers`` library,
  for the tiny random-initialised variants (no tokenizer download, no dependency on a hub file).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from grand_pipeline.models import weights

if TYPE_CHECKING:
    from grand_pipeline.models.hub import ModelHub

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Words of the tiny tokenizers: enough for prompts and label lists to map to real ids.
TINY_WORDS = (
    "a an the of in on at with and or to is are this that photo picture image question answer "
    "what where describe short caption describes shows there here it its from by for as "
    "user assistant system : , . ? ! ' \" ( ) - "
    "person man woman child people dog cat bird horse car truck bus bicycle motorcycle train "
    "boat airplane road street building house tree grass sky cloud water sea river mountain "
    "table chair sofa bed cup mug coffee espresso saucer plate bowl bottle glass food book "
    "laptop computer phone television lamp window door wall floor field park beach city "
    "white black red green blue yellow brown grey gray orange pink purple wooden metal small large "
    "indoor outdoor scene space living work public industrial urban rural natural landscape "
    "transportation airport station port harbor sports recreation sporting venue recreational "
    "area gym fitness center"
).split()


@contextmanager
def quiet(stderr_too: bool = False) -> Iterator[None]:
    """Only the CLI draws progress bars; transformers' load/save bars are off meanwhile.

    ``stderr_too`` also swallows plain tqdm bars that ignore transformers' switch (GGUF
    de-quantisation draws one). Logging handlers keep the stream they were created with, so
    warnings still reach the log."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()) if stderr_too else contextlib.nullcontext():
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def torch_dtype(spec: Any, device: torch.device) -> torch.dtype:
    """``spec.dtype`` as a torch dtype; half precision on a CPU falls back to float32 (slow/unsupported)."""
    name = str(getattr(spec, "dtype", "") or "float32")
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(table)}")
    if device.type == "cpu" and name != "float32":
        logger.info("dtype %s requested on the CPU: using float32", name)
        return torch.float32
    return table[name]


def device_of(spec: Any) -> torch.device:
    name = str(getattr(spec, "device", "") or "cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_folder(spec: Any, name: str, tiny_builder: Callable[[Path, int], None]) -> weights.ResolvedWeights:
    """Resolve ``spec.model`` to a Hugging Face model folder (a file is refused with one clear line)."""
    resolved = weights.resolve(str(getattr(spec, "model", "") or ""), name=name, tiny_builder=tiny_builder)
    if not resolved.path.is_dir():
        raise weights.ModelSourceError(f"{name}: expected a Hugging Face model folder, got file {resolved.path}")
    return resolved


def shared(hub: ModelHub | None, kind: str, path: Path, factory: Callable[[], T]) -> T:
    """``hub``'s shared instance of ``kind`` loaded from ``path`` (``factory`` runs once per hub
    and key); a backend built without a hub gets its own instance."""
    return factory() if hub is None else hub.shared(kind, path, factory)


def load_pretrained(model_cls: Any, processor_cls: Any, path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model in eval mode, processor) from a local folder.

    ``local_files_only``: a missing file must fail here, never turn into a hub download.
    """
    with quiet():
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype)
        processor = processor_cls.from_pretrained(path, local_files_only=True)
    return model.eval(), processor


def shared_pretrained(
    hub: ModelHub | None,
    kind: str,
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    load: Callable[[Path, torch.dtype], tuple[Any, Any]],
) -> tuple[Any, Any]:
    """``hub``'s shared (model on ``device``, processor) that ``load(path, dtype)`` reads.

    The key is ``kind:device:dtype``: backends that name the same ``kind`` (the CLIP tagger and
    label assigner both say ``clip``) share one copy of the weights on the GPU.
    """

    def factory() -> tuple[Any, Any]:
        model, processor = load(path, dtype)
        return model.to(device), processor

    return shared(hub, f"{kind}:{device}:{dtype}", path, factory)


def save_pretrained(folder: Path, model: Any, processor: Any) -> None:
    """``model`` and its processor (or tokenizer) side by side in ``folder``, for ``from_pretrained``."""
    with quiet():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


def tiny_tokenizer(extra_special: tuple[str, ...] = (), lowercase: bool = True, wrap: bool = False) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``TINY_WORDS``; ids 0-3 are pad/unk/bos/eos.

    ``wrap`` adds ``<s> ... </s>`` around every text, as CLIP's tokenizer does (its text tower
    pools at the end-of-text token). It has no chat template (``chat_template`` is None), like
    the paper's Vicuna-13B-v1.5: a prompt rendered with it goes through the ``auto`` fallback of
    :mod:`grand_pipeline.models.chat_templates`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", *extra_special]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *TINY_WORDS]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    # Whitespace + punctuation splitting, so "coffee." maps to two known words, not to <unk>.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins word pieces with spaces
    if wrap:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(extra_special),
    )
    tokenizer.chat_template = None  # stated, not inherited: the fallback path depends on it
    return tokenizer


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` under a private RNG seeded with ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
