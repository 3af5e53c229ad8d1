"""The stage protocol: one stage per file, each declaring what it needs and what it writes.

A stage is built once per actor (its ``__init__`` loads its models through the ``ModelHub``) and is
then called on micro-batches of ``ImageRecord``. The base class checks the input contract, runs
the batch, and turns a failure into error rows: a batch that raises is retried image by image so
one bad image cannot take its neighbours down, and the stage that failed is recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa

from grand_pipeline.models.roles import Backend, Region
from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK

logger = logging.getLogger(__name__)

B = TypeVar("B", bound=Backend)

#: Record attributes a stage may require besides ``fields``.
RECORD_ATTRIBUTES = ("image", "regions", "width", "height")

#: The in-memory record field through which an LLM stage hands the runner what its verify loop
#: tried: ``{stage: [failed check names of each attempt]}`` (``[]``: that attempt passed). The
#: check names come from the checks themselves (``levels.verify.Issue.check``), never from parsing
#: their messages. The runner counts the field into its level after the stages and removes it; no
#: row ever reads it.
LLM_ATTEMPTS_FIELD = "_llm_attempts"


class StageContractError(RuntimeError):
    """A stage was handed records without the fields it requires (a wiring bug, not bad data)."""


class StartupCheckFailed(RuntimeError):
    """A stage's LLM failed its one tiny start-up generation: the run must stop before it takes a
    shard, instead of committing rows whose every attempt says "generation failed"."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"LLM {model} failed its start-up generation: {reason}")
        self.model = model
        self.reason = reason

    def __reduce__(self) -> tuple[type[StartupCheckFailed], tuple[str, str]]:
        # Raised inside a Ray actor and re-raised in the driver: pickle the two fields, not the
        # formatted message (the default would call __init__ with one argument).
        return type(self), (self.model, self.reason)


@dataclass
class ImageRecord:
    """One image travelling through a level's stages inside an actor."""

    image_id: str
    shard_id: str
    file_name: str = ""
    width: int = 0
    height: int = 0
    image: np.ndarray | None = None
    """RGB uint8 (H, W, 3), decoded once per actor and shared by every stage of the level."""
    regions: list[Region] = field(default_factory=list)
    """Class-agnostic SA-1B masks of the image, when the source has them."""
    fields: dict[str, Any] = field(default_factory=dict)
    status: str = STATUS_OK
    error: str | None = None
    error_stage: str | None = None
    backends: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pixels(self) -> np.ndarray:
        """The decoded image; stages that declare ``requires["image"]`` may rely on it."""
        if self.image is None:
            raise ValueError(f"image {self.image_id} was not decoded")
        return self.image

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def fail(self, stage: str, message: str) -> None:
        self.status = STATUS_ERROR
        self.error = message[:2000]
        self.error_stage = stage


StageHook = Callable[[str, int, int, float], None]
"""(stage name, images ok, images failed, seconds) -> None; the engine feeds metrics from it."""


class Stage:
    """Base class. Subclasses set the class attributes and implement ``process``."""

    name: ClassVar[str] = ""
    requires: ClassVar[dict[str, str]] = {}
    """Input key -> description. Keys are ``fields`` entries or ``RECORD_ATTRIBUTES``."""
    provides: ClassVar[dict[str, pa.DataType | None]] = {}
    """Output key -> Arrow type of its column; ``None`` marks an in-memory hand-over only."""
    models: ClassVar[tuple[str, ...]] = ()
    """ModelHub keys this stage uses; loaded once, in ``__init__``."""
    optional_models: ClassVar[tuple[str, ...]] = ()
    """Those of ``models`` the stage can do without: skipped when ``cfg.models`` has none."""

    def __init__(self, cfg: Any, hub: Any) -> None:
        self.cfg = cfg
        self.backends: dict[str, Backend] = {
            key: hub.get(key)
            for key in self.models
            if key not in self.optional_models or getattr(cfg.models, key, None) is not None
        }

    def backend(self, key: str, role: type[B]) -> B:
        """The loaded backend under ``key``, checked to implement ``role``."""
        found = self.backends[key]
        if not isinstance(found, role):
            raise TypeError(f"stage {self.name!r}: {key} is a {type(found).__name__}, not a {role.__name__}")
        return found

    def process(self, records: list[ImageRecord]) -> None:
        """Fill ``provides`` keys on every record (all are ``ok`` and meet ``requires``)."""
        raise NotImplementedError

    def startup_check(self) -> None:
        """Called once per actor after the stages are built, before any shard is taken.

        Asks each of the stage's backends for ``startup_problem()``, which is a no-op (None) for
        every backend except an LLM (and a backend that writes through one, like the lite
        captioner): those run one tiny generation. So stages that use no LLM check nothing, and
        LLM stages need no code of their own. Raises ``StartupCheckFailed`` on the first problem.
        """
        for key, backend in self.backends.items():
            probe = getattr(backend, "startup_problem", None)
            problem = probe() if callable(probe) else None
            if problem is not None:
                logger.error("stage %s: %s failed its start-up check: %s", self.name, key, problem.reason)
                raise StartupCheckFailed(problem.model, problem.reason)

    def _check_contract(self, records: list[ImageRecord]) -> None:
        for record in records:
            missing = [
                key
                for key in self.requires
                if key not in record.fields and key not in RECORD_ATTRIBUTES
            ]
            if missing:
                raise StageContractError(
                    f"stage {self.name!r} requires {missing} but image {record.image_id} has "
                    f"fields {sorted(record.fields)}"
                )

    def _stamp(self, record: ImageRecord) -> None:
        for backend in self.backends.values():
            record.backends.append({"stage": self.name, **_provenance(backend)})

    def __call__(self, records: list[ImageRecord], hook: StageHook | None = None) -> None:
        live = [r for r in records if r.ok]
        if not live:
            return
        self._check_contract(live)
        start = time.perf_counter()
        try:
            self.process(live)
        except StageContractError:
            raise
        except Exception:  # noqa: BLE001 - isolate the bad image(s) below
            if len(live) == 1:
                self._fail(live[0])
            else:
                logger.info("stage %s failed on a batch of %d; retrying one by one", self.name, len(live))
                for record in live:
                    try:
                        self.process([record])
                    except StageContractError:
                        raise
                    except Exception:  # noqa: BLE001 - failures are data
                        self._fail(record)
        failed = 0
        for record in live:
            if record.ok:
                self._stamp(record)
            else:
                failed += 1
        if hook is not None:
            hook(self.name, len(live) - failed, failed, time.perf_counter() - start)

    def _fail(self, record: ImageRecord) -> None:
        import sys

        exc = sys.exc_info()[1]
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("stage %s failed on %s: %s", self.name, record.image_id, message)
        record.fail(self.name, message)


def _provenance(backend: Backend) -> dict[str, Any]:
    info = backend.describe()
    return {
        "role": info["role"],
        "backend": info["backend"],
        "model_id": info["model_id"],
        "heuristic": bool(info["heuristic"]),
        "weights": str(info.get("weights") or ""),
    }
