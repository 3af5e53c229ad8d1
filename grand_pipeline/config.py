"""Typed run configuration: dataclasses, YAML profiles, dotted ``--set`` overrides, a content hash.

A profile (``grand_pipeline/profiles/{name}.yaml``) is a partial tree over ``GrandConfig``;
``--config FILE`` and ``--set a.b=v`` are merged on top, in that order. Every key is checked
against the dataclasses, and a bad key or value raises ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the dotted key."""


@dataclass
class ModelSpec:
    backend: str
    """Registered backend name for the role (see ``grand_pipeline.models.roles.BACKENDS``)."""
    model: str = ""
    """Weights source: ``package:<name>``, ``hf:org/name@rev``, a local path, ``s3://`` or ``tiny:<seed>``."""
    revision: str = ""
    dtype: str = "float32"
    batch_size: int = 8
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    """Backend-specific knobs (input size, the model's own candidate floor, ...). Checked at load
    against the backend's options dataclass (``roles.register_backend``), kept here as plain data so
    that the config and its content hash do not depend on the backends."""


@dataclass
class ModelsConfig:
    tagger: ModelSpec
    detectors: dict[str, ModelSpec]
    """The detector ensemble: member name -> spec. Member names key the per-model thresholds."""
    segmenter: ModelSpec
    depth: ModelSpec
    region_captioner: ModelSpec
    text_embedder: ModelSpec | None = None
    captioner: ModelSpec | None = None
    phrase_extractor: ModelSpec | None = None
    grounder: ModelSpec | None = None
    landmark_classifier: ModelSpec | None = None
    label_assigner: ModelSpec | None = None
    llm: ModelSpec | None = None


@dataclass
class PersonRules:
    labels: list[str] = field(default_factory=lambda: ["person", "man", "woman", "men", "women"])
    """Labels rewritten to ``person`` and governed by these rules."""
    promote: dict[str, float] = field(default_factory=dict)
    """member -> score above which an unmatched person still becomes an object."""
    drop_unmatched_from: list[str] = field(default_factory=list)
    """Members whose unmatched person boxes are dropped instead of kept floating."""
    floor: float = 0.2
    """Person boxes of ``promote`` members pass the score pre-filter at min(threshold, floor)."""


@dataclass
class Level1Config:
    tag_top_k: int = 8
    tag_threshold: float = 0.1
    score_thresholds: dict[str, float] = field(default_factory=dict)
    """Per-member score pre-filter applied before that member's NMS; missing members use 0.1."""
    trusted: dict[str, float] = field(default_factory=dict)
    """member -> score above which its detection becomes an object without a second vote, for any
    label (persons have their own rules). For ensembles with a single strong closed-set detector,
    such as the lite profile's NanoDet beside the region tagger; empty keeps the paper's rule."""
    nms_iou: float = 0.9
    vote_iou: float = 0.65
    min_models: int = 2
    box_fusion: Literal["weighted", "anchor"] = "weighted"
    """How a voted object's box is formed: score-weighted mean of members, or the anchor's box."""
    vote_order: list[str] = field(default_factory=list)
    """Members in anchor priority order; empty means the order of ``models.detectors``."""
    person: PersonRules = field(default_factory=PersonRules)
    mask_iou: float = 0.65
    """An SA-1B mask is attached when its box IoU with the object box reaches this."""
    mask_containment: float = 0.8
    """...and when at least this share of its pixels lies inside the object box. Box IoU alone
    accepts a whole-image blob for an object that fills most of the frame."""
    region_min_area: float = 0.01
    """Region proposals smaller than this fraction of the image are not classified."""
    floating_attribute_iou: float = 0.65
    max_regions: int = 256
    """Leftover SA-1B regions described as floating attributes per image, largest box first (ties
    keep file order); the rest are dropped and counted in a log line. Each costs a region-captioner
    crop, so an image with 20,000 masks would otherwise take minutes. SA-1B images average ~100
    masks, few of them leftovers of at least ``region_min_area``, so the cap rarely bites."""
    max_image_pixels: int = 60_000_000
    """Images above this are refused with an error row instead of exhausting memory. Measured
    peak RSS of a tiny-lite Level-1 process on one image with 14 segmented masks
    (``benchmarks/large_image_memory.py``): about 1.1 GB (models) + 37 MB per megapixel, i.e.
    1.7 GB at 16 MP and 3.3 GB at 59 MP (it was 14.4 GB at 59 MP while the segmenter upsampled
    16 masks at once). So at 60 MP a micro-batch of two images peaks near 5.5 GB."""


@dataclass
class Level2Config:
    grounding_iou: float = 0.75
    """A grounding box matches an object above this IoU; unmatched ones become floating objects."""
    promote_min_labels: int = 2
    """A floating object with at least this many distinct labels is promoted to an object."""
    promote_min_models: int = 2
    """... or with at least this many distinct models behind it. A phrase grounded to a floating
    object is the captioner + grounder agreeing with the detector, even when the words agree too
    (the reference counts that as a vote by appending the noun again)."""
    max_phrases: int = 16


@dataclass
class Level3Config:
    layer_thresholds: list[float] = field(default_factory=lambda: [0.1, 0.6, 0.85])
    """Normalised depth bounds of immediate foreground / foreground / midground (0 = nearest)."""
    group_radius: float = 0.2
    """Objects of a layer within this fraction of the image diagonal of a seed share its group."""
    max_objects: int = 100
    max_attempts: int = 3
    temperature: float = 0.7
    max_new_tokens: int = 200
    embedding_match: float = 0.75
    """Cosine similarity above which a caption phrase is grounded by embedding match."""
    first_temperature: float | None = None
    """Sampling temperature of attempt 1 (None: ``temperature``). Greedy first answers are the
    most faithful from small models; regenerations then sample, so they differ from attempt 1."""
    opener: bool = False
    """Start every caption with the graph's most confident thing ("A person") and let the LLM go
    on; for small models that drift from the graph (the lite profile). Rows stamp the
    ``dense_caption_opener`` prompts when it is on."""


@dataclass
class Level4Config:
    max_objects: int = 30
    max_attempts: int = 3
    temperature: float = 0.7
    max_new_tokens: int = 320
    first_temperature: float | None = None
    """As ``level3.first_temperature``."""
    min_sentences: int = 5
    max_sentences: int = 7
    relevance_similarity: float = 0.6
    """Cosine (text embedder) at which a context word counts as naming a scene item ("kitten" ~
    "cat" is 0.79 with MiniLM; unrelated words stay below 0.5)."""


@dataclass
class PoolConfig:
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    micro_batch: int = 4
    """Images per micro-batch inside a shard."""


@dataclass
class EngineConfig:
    executor: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    """None starts a local Ray; ``auto`` joins the cluster of ``ray job submit``."""
    max_in_flight_per_actor: int = 2
    max_shard_retries: int = 2
    torch_threads: int = 0
    """Threads per actor for torch; 0 means the pool's ``num_cpus``. Outputs are bit-identical
    only for the same thread count."""
    unit_images: int = 500
    """Images per sub-shard unit, the unit of work, commit and retry. Fixed for an output once
    its first shard is indexed (a different value is refused on resume)."""
    prefetch_batches: int = 1
    """Micro-batches read and decoded ahead by a thread inside each actor while the current one
    runs on the models; 0 reads in line."""


@dataclass
class GrandConfig:
    profile: str
    models: ModelsConfig
    plugins: list[str] = field(default_factory=list)
    """Modules imported in every actor before models load; they register extra backends."""
    level1: Level1Config = field(default_factory=Level1Config)
    level2: Level2Config = field(default_factory=Level2Config)
    level3: Level3Config = field(default_factory=Level3Config)
    level4: Level4Config = field(default_factory=Level4Config)
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {"level1": PoolConfig()})
    engine: EngineConfig = field(default_factory=EngineConfig)

    def pool(self, level: int) -> PoolConfig:
        return self.pools.get(f"level{level}", PoolConfig())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """Hash of everything that changes outputs; pools and engine only change speed."""
        data = self.to_dict()
        data.pop("pools")
        data.pop("engine")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _profiles_dir() -> Path:
    return Path(str(resources.files("grand_pipeline") / "profiles"))


def profiles() -> list[str]:
    """Names of the shipped profiles (one YAML file each)."""
    return sorted(p.stem for p in _profiles_dir().glob("*.yaml"))


def profile_path(name: str) -> Path:
    if name not in profiles():
        raise ConfigError(f"profile: unknown profile {name!r}; known: {', '.join(profiles())}")
    return _profiles_dir() / f"{name}.yaml"


def _read_yaml(path: Path | str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; known here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def check_ranges(
    obj: Any,
    *,
    unit: tuple[str, ...] = (),
    at_least_one: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
) -> None:
    """Raise ``ConfigError("field: why")`` for the first field of ``obj`` out of its range.

    ``unit`` fields lie within [0, 1], ``at_least_one`` are >= 1, ``non_negative`` >= 0,
    ``positive`` > 0. A None value (an optional field left unset) passes; a mapping or list is
    checked value by value and the key names the entry (``score_thresholds.nanodet``). Shared by
    the level configs here and by the backends' option dataclasses, so a range reads the same
    everywhere."""
    rules = (
        (unit, lambda v: 0.0 <= v <= 1.0, "must be within [0, 1]"),
        (at_least_one, lambda v: v >= 1, "must be >= 1"),
        (non_negative, lambda v: v >= 0, "must be >= 0"),
        (positive, lambda v: v > 0, "must be > 0"),
    )
    for names, ok, why in rules:
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, dict):
                entries = [(f"{name}.{k}", v) for k, v in value.items()]
            elif isinstance(value, list | tuple):
                entries = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            else:
                entries = [(name, value)]
            for key, v in entries:
                if v is not None and not ok(v):
                    raise ConfigError(f"{key}: {why}, got {v!r}")


def _check_level1(obj: Level1Config) -> None:
    check_ranges(
        obj,
        unit=("tag_threshold", "score_thresholds", "trusted", "nms_iou", "vote_iou", "mask_iou",
              "mask_containment", "region_min_area", "floating_attribute_iou"),
        at_least_one=("tag_top_k", "min_models", "max_image_pixels"),
        non_negative=("max_regions",),
    )


def _check_person(obj: PersonRules) -> None:
    check_ranges(obj, unit=("promote", "floor"))


def _check_level2(obj: Level2Config) -> None:
    check_ranges(
        obj,
        unit=("grounding_iou",),
        at_least_one=("promote_min_labels", "promote_min_models", "max_phrases"),
    )


def _check_generation(obj: Level3Config | Level4Config) -> None:
    """The verified LLM loop's knobs, shared by levels 3 and 4."""
    check_ranges(
        obj,
        at_least_one=("max_objects", "max_attempts", "max_new_tokens"),
        non_negative=("temperature", "first_temperature"),
    )


def _check_level3(obj: Level3Config) -> None:
    _check_generation(obj)
    check_ranges(obj, unit=("layer_thresholds", "embedding_match"), positive=("group_radius",))
    bounds = obj.layer_thresholds
    # Three bounds split four named layers (immediate foreground .. background); equal or falling
    # bounds would leave a layer that no object can ever land in.
    if len(bounds) != 3 or any(lo >= hi for lo, hi in zip(bounds, bounds[1:], strict=False)):
        raise ConfigError(f"layer_thresholds: needs 3 strictly increasing bounds, got {bounds}")


def _check_level4(obj: Level4Config) -> None:
    _check_generation(obj)
    check_ranges(obj, unit=("relevance_similarity",), at_least_one=("min_sentences",))
    if obj.min_sentences > obj.max_sentences:
        raise ConfigError(
            f"min_sentences: {obj.min_sentences} is above max_sentences ({obj.max_sentences})"
        )


def _check_engine(obj: EngineConfig) -> None:
    check_ranges(
        obj,
        at_least_one=("unit_images", "max_in_flight_per_actor"),
        non_negative=("max_shard_retries", "torch_threads", "prefetch_batches"),
    )


def _check_pool(obj: PoolConfig) -> None:
    check_ranges(obj, at_least_one=("num_actors", "micro_batch"), non_negative=("num_cpus", "num_gpus"))
    if obj.num_gpus > 1 and not float(obj.num_gpus).is_integer():
        # Ray shares a GPU between actors only below one; above, it wants whole GPUs.
        raise ConfigError(f"num_gpus: above 1 must be a whole number, got {obj.num_gpus}")
    for name in obj.resources:
        # CPU/GPU have their own fields; Ray rejects them (and memory) as custom resources.
        if not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"resources.{name}: use num_cpus/num_gpus; custom names only")
    check_ranges(obj, non_negative=("resources",))


def _check_spec(obj: ModelSpec) -> None:
    check_ranges(obj, at_least_one=("batch_size",))


#: Checks per config class, run by ``build`` once the object exists; each raises
#: ``ConfigError("field: why")`` and ``build`` puts the dotted prefix in front.
CHECKS: dict[type, Any] = {
    Level1Config: _check_level1,
    PersonRules: _check_person,
    Level2Config: _check_level2,
    Level3Config: _check_level3,
    Level4Config: _check_level4,
    EngineConfig: _check_engine,
    PoolConfig: _check_pool,
    ModelSpec: _check_spec,
}


def _validate(obj: Any, prefix: str) -> None:
    """Run ``obj``'s check: the ``CHECKS`` entry of its class, or its own ``validate()`` method
    (the backends' option dataclasses), and name the dotted key in the error."""
    check = CHECKS.get(type(obj)) or getattr(type(obj), "validate", None)
    if check is None:
        return
    try:
        check(obj)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None


def load_config(
    profile: str = "lite", config_file: str | Path | None = None, overrides: list[str] | None = None
) -> GrandConfig:
    data = _read_yaml(profile_path(profile))
    if config_file:
        data = deep_merge(data, _read_yaml(config_file))
    for item in overrides or []:
        data = deep_merge(data, parse_override(item))
    data["profile"] = profile
    cfg = build(GrandConfig, data)
    members = set(cfg.models.detectors)
    member_keys = (
        ("vote_order", cfg.level1.vote_order),
        ("score_thresholds", cfg.level1.score_thresholds),
        ("trusted", cfg.level1.trusted),
        ("person.promote", cfg.level1.person.promote),
        ("person.drop_unmatched_from", cfg.level1.person.drop_unmatched_from),
    )
    for key, names in member_keys:
        for name in names:
            if name not in members:
                raise ConfigError(
                    f"level1.{key}: {name!r} is not a detector member; "
                    f"members: {', '.join(sorted(members))}"
                )
    # Backend names and options are checked against the backend registries here, at load time,
    # so that a typo costs one line and exit 2 rather than a failed actor after models load.
    # Imported late: the models package imports this module.
    from grand_pipeline.models.hub import validate_models

    validate_models(cfg)
    return cfg
