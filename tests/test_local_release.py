"""The local executor gives a level's models back when the driver releases the level.

Models that backends share (one CLIP for the tagger and the label assigner, one BLIP-2 for both
captioners) live in the ``ModelHub`` of the level's runner, not in a process-wide cache: so
``release(level)`` frees them on the local executor as killing the actors does on Ray.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from grand_pipeline.config import load_config
from grand_pipeline.engine.executors import LocalExecutor
from grand_pipeline.sample import make_sample
from grand_pipeline.sources import index_shard, list_shards
from grand_pipeline.units import ShardIndex

pytestmark = pytest.mark.slow


def test_release_frees_the_levels_shared_models(tmp_path, tiny_cfg) -> None:
    make_sample(str(tmp_path / "in"), tiny_cfg, images=1, shard_id="sa_000050", start=1)
    cfg = load_config("tiny")  # the full profile's backends, tiny weights: hf_common.shared in use
    [ref] = list_shards(str(tmp_path / "in"))
    ids, offsets = index_shard(ref)
    index = ShardIndex(ref.shard_id, cfg.engine.unit_images, tuple(ids), None if offsets is None else tuple(offsets))
    [unit] = index.units(ref)

    executor = LocalExecutor(cfg, str(tmp_path / "out"))
    executor.submit(1, unit)
    [outcome] = executor.wait()
    assert outcome.error is None and outcome.result is not None
    # The runner is the executor's own; reaching into it is the only way to name a loaded model.
    tagger = executor._runners[1].hub.get("tagger")
    model = weakref.ref(tagger.model)  # the CLIP the hub shares (hf_common.shared_pretrained)
    assert model() is not None
    del tagger, outcome

    executor.release(1)
    gc.collect()
    assert model() is None, "the released level's shared CLIP is still alive"
