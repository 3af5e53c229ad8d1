"""Tests for the input readers, on real photographs from scikit-image."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils

from grand_pipeline.sources import (
    ImageDecodeError,
    ShardRef,
    SourceError,
    UnsafeIdError,
    decode_image,
    iter_image_folder,
    iter_sa1b_tar,
    iter_shard,
    list_shards,
    read_images,
    safe_id,
    write_sa1b_tar,
)

PHOTOS = {"sa_1": skimage.data.astronaut, "sa_2": skimage.data.coffee, "sa_3": skimage.data.chelsea}


def _jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _sa1b_json(stem: str, arr: np.ndarray) -> dict:
    """SA-1B-style JSON with one real COCO RLE mask (the bright pixels of the photo)."""
    h, w = arr.shape[:2]
    m = np.asfortranarray((arr.mean(axis=2) > 128).astype(np.uint8))
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    ann = {
        "id": 1,
        "segmentation": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
        "predicted_iou": 0.93,
        "stability_score": 0.97,
        "point_coords": [[w / 2, h / 2]],
        "crop_box": [0, 0, w, h],
    }
    return {
        "image": {"image_id": int(stem.split("_")[1]), "width": w, "height": h, "file_name": f"{stem}.jpg"},
        "annotations": [ann],
    }


@pytest.fixture(scope="module")
def items() -> list[tuple[str, bytes, dict]]:
    out = []
    for stem, load in PHOTOS.items():
        arr = load()
        out.append((stem, _jpeg(arr), _sa1b_json(stem, arr)))
    return out


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (names are not sanitized)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _ref(uri: str, shard_id: str = "shard") -> ShardRef:
    return ShardRef(shard_id, uri, "sa1b_tar")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------- SA-1B tar roundtrip


def test_write_then_iter_roundtrip(tmp_path, items):
    tar = tmp_path / "sa_000001.tar"
    write_sa1b_tar(str(tar), items)
    (ref,) = list_shards(str(tar))
    assert ref.shard_id == "sa_000001" and ref.kind == "sa1b_tar" and ref.uri.startswith("file://")
    got = list(iter_shard(ref))
    assert [g.image_id for g in got] == ["sa_1", "sa_2", "sa_3"]
    for g, (stem, jpeg, meta) in zip(got, items, strict=True):
        assert g.error is None and g.shard_id == "sa_000001" and g.file_name == f"{stem}.jpg"
        assert g.data == jpeg and g.annotations == meta["annotations"]
        assert (g.width, g.height) == (meta["image"]["width"], meta["image"]["height"])
        pixels = decode_image(g.data, max_pixels=10_000_000)
        original = PHOTOS[stem]()
        assert pixels.shape == original.shape and pixels.dtype == np.uint8
        assert np.abs(pixels.astype(int) - original).mean() < 6  # JPEG loss only
        decoded = mask_utils.decode(g.annotations[0]["segmentation"])
        assert decoded.shape == original.shape[:2]
        assert np.array_equal(decoded, (original.mean(axis=2) > 128).astype(np.uint8))


def test_writer_is_deterministic_and_gz_roundtrips(tmp_path, items):
    a, b, gz = tmp_path / "a.tar", tmp_path / "b.tar", tmp_path / "sa_000009.tar.gz"
    write_sa1b_tar(str(a), items)
    write_sa1b_tar(str(b), items)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tf:
        assert tf.getnames() == ["sa_1.jpg", "sa_1.json", "sa_2.jpg", "sa_2.json", "sa_3.jpg", "sa_3.json"]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tf.getmembers()} == {(0, 0, 0, 0o644)}
    write_sa1b_tar(str(gz), items)
    gz_first = gz.read_bytes()
    write_sa1b_tar(str(gz), items)
    assert gz.read_bytes() == gz_first
    (ref,) = list_shards(str(gz))
    assert ref.shard_id == "sa_000009"
    assert [g.image_id for g in iter_shard(ref) if g.error is None] == ["sa_1", "sa_2", "sa_3"]
    with pytest.raises(ValueError):
        write_sa1b_tar(str(tmp_path / "x.tar"), [("../x", b"", {})])


def test_json_before_jpg_and_interleaved(tmp_path, items):
    members = []
    for stem, jpeg, meta in items:  # json first for every pair
        members += [(f"{stem}.json", json.dumps(meta).encode()), (f"{stem}.jpg", jpeg)]
    got = list(iter_sa1b_tar(_ref(str(_raw_tar(tmp_path / "a.tar", members)))))
    assert [(g.image_id, g.error) for g in got] == [("sa_1", None), ("sa_2", None), ("sa_3", None)]
    # all jpgs first, then the jsons in reverse: pairs yield in completion order
    members = [(f"{s}.jpg", j) for s, j, _ in items] + [
        (f"{s}.json", json.dumps(m).encode()) for s, _, m in reversed(items)
    ]
    got = list(iter_sa1b_tar(_ref(str(_raw_tar(tmp_path / "b.tar", members)))))
    assert [(g.image_id, g.error) for g in got] == [("sa_3", None), ("sa_2", None), ("sa_1", None)]
    assert all(g.data == j for g, (_, j, _) in zip(got, reversed(items), strict=True))


def test_reader_never_writes_files_local_and_memory(tmp_path, monkeypatch, items):
    local = tmp_path / "in" / "sa_000001.tar"
    write_sa1b_tar(str(local), items)
    mem_uri = "memory://bucket/shards/sa_000001.tar"
    write_sa1b_tar(mem_uri, items)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    for uri in (str(local), mem_uri):
        (ref,) = list_shards(uri)
        assert ref.uri == (mem_uri.replace("memory://", "memory:///") if uri == mem_uri else ref.uri)
        assert [g.image_id for g in iter_shard(ref) if g.error is None] == ["sa_1", "sa_2", "sa_3"]
    assert _tree(tmp_path) == before
    fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_hostile_member_names(tmp_path, monkeypatch, items):
    _, jpeg, meta = items[0]
    blob = json.dumps(meta).encode()
    tar = _raw_tar(
        tmp_path / "evil.tar",
        [
            ("../../evil.jpg", jpeg),
            ("../../evil.json", blob),
            ("/abs/sa_9.jpg", jpeg),
            ("/abs/sa_9.json", blob),
            ("bad name!.jpg", jpeg),
            ("bad name!.json", blob),
            ("notes.txt", b"ignore me"),
            ("._sa_1.jpg", b"macos junk"),
        ],
    )
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    before = _tree(tmp_path)
    got = {g.image_id: g for g in iter_sa1b_tar(_ref(str(tar)))}
    assert _tree(tmp_path) == before
    assert not Path("/abs").exists() and not any(
        p.name.startswith("evil.") for p in tmp_path.rglob("*") if p != tar
    )
    # A name that climbs out or is absolute is never merged by basename: each pair is its own
    # error row, under an id hashed from the whole name, and the message names the member.
    assert all(k.startswith("unsafe-") for k in got) and len(got) == 3
    assert sorted(g.error for g in got.values()) == [
        "unsafe member name '../../evil'",
        "unsafe member name '/abs/sa_9'",
        "unsafe member name 'bad name!'",
    ]


# ---------------------------------------------------------------- broken input


def _cut(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def test_truncated_tar_keeps_earlier_images(tmp_path, items):
    full = tmp_path / "full.tar"
    write_sa1b_tar(str(full), items)
    got = list(iter_sa1b_tar(_ref(str(_cut(full, tmp_path / "half.tar", full.stat().st_size // 2)), "half")))
    ok = [g for g in got if g.error is None]
    assert ok and [g.image_id for g in ok] == ["sa_1", "sa_2", "sa_3"][: len(ok)]
    assert all(g.data == jpeg for g, (_, jpeg, _) in zip(ok, items, strict=False))
    assert got[-1].image_id == "half__truncated" and got[-1].error.startswith("truncated tar after ")
    # the cut lands inside sa_2.jpg: its id still shows up, as an error row
    assert [(g.image_id, g.data is None) for g in got] == [
        ("sa_1", False),
        ("sa_2", True),
        ("half__truncated", True),
    ]
    assert "sa_2.jpg unreadable" in got[1].error


def test_truncated_at_member_boundary_is_detected(tmp_path, items):
    """tarfile silently stops at a header-boundary cut; the reader must still flag it."""
    full = tmp_path / "full.tar"
    write_sa1b_tar(str(full), items)
    with tarfile.open(full) as tf:
        m = tf.getmember("sa_1.json")
        boundary = m.offset_data + (m.size + 511) // 512 * 512
    got = list(iter_sa1b_tar(_ref(str(_cut(full, tmp_path / "cut.tar", boundary)), "cut")))
    assert [(g.image_id, g.error is None) for g in got] == [("sa_1", True), ("cut__truncated", False)]
    assert "after 2 members" in got[-1].error


def test_truncated_gz_and_garbage_file(tmp_path, items):
    gz = tmp_path / "full.tar.gz"
    write_sa1b_tar(str(gz), items)
    got = list(iter_sa1b_tar(_ref(str(_cut(gz, tmp_path / "cut.tar.gz", gz.stat().st_size * 2 // 3)), "g")))
    assert got[-1].image_id == "g__truncated" and sum(g.error is None for g in got) >= 1
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 10)
    (only,) = list(iter_sa1b_tar(_ref(str(junk), "junk")))
    assert only.image_id == "junk__truncated" and only.error.startswith("truncated tar after 0 members")
    (missing,) = list(iter_sa1b_tar(_ref(str(tmp_path / "gone.tar"), "gone")))
    assert missing.image_id == "gone__truncated"


def test_bad_missing_and_orphan_json(tmp_path, items):
    (_, j1, m1), (_, j2, m2), (_, j3, _) = items
    no_anns = {"image": m2["image"]}
    tar = _raw_tar(
        tmp_path / "bad.tar",
        [
            ("sa_1.jpg", j1),
            ("sa_1.json", b"{not json"),
            ("sa_2.jpg", j2),
            ("sa_2.json", json.dumps(no_anns).encode()),
            ("sa_3.jpg", j3),  # json never arrives
            ("sa_4.json", json.dumps(m1).encode()),  # image never arrives
        ],
    )
    got = {g.image_id: g for g in iter_sa1b_tar(_ref(str(tar)))}
    assert set(got) == {"sa_1", "sa_2", "sa_3", "sa_4"}
    assert got["sa_1"].error.startswith("bad SA-1B json") and got["sa_1"].data == j1
    assert got["sa_2"].error.startswith("bad SA-1B json") and "annotations" in got["sa_2"].error
    assert got["sa_3"].error == "missing SA-1B json for sa_3" and got["sa_3"].data == j3
    assert got["sa_4"].error == "missing image for sa_4" and got["sa_4"].data is None


def test_duplicate_members_keep_the_first_and_report_the_rest(tmp_path, items):
    stem, jpeg, meta = items[0]
    blob = json.dumps(meta).encode()
    tar = _raw_tar(
        tmp_path / "dup.tar",
        [("sa_1.jpg", jpeg), ("sa_1.json", blob), ("x/sa_1.jpg", b"other"), ("x/sa_1.json", blob)],
    )
    got = list(iter_sa1b_tar(_ref(str(tar))))
    # One row per id: the first pair is the image, each later member an error row of its own.
    kept = "the first one is kept"
    assert [(g.image_id, g.error, g.data == jpeg) for g in got] == [
        ("sa_1", None, True),
        ("sa_1__dup1", f"duplicate member 'x/sa_1.jpg': sa_1 already has an image; {kept}", False),
        ("sa_1__dup2", f"duplicate member 'x/sa_1.json': sa_1 already has a json; {kept}", False),
    ]


# ---------------------------------------------------------------- decode_image


def test_decode_rejects_corrupt_and_truncated_jpeg():
    good = _jpeg(skimage.data.astronaut())
    sos = good.find(b"\xff\xda")
    garbage = good[: sos + 20] + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    for bad in (garbage, good[: len(good) // 2], good[:sos], b"not an image at all"):
        with pytest.raises(ImageDecodeError):
            decode_image(bad, max_pixels=10_000_000)


def test_decode_resets_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = _jpeg(skimage.data.coffee())
    with pytest.raises(ImageDecodeError):
        decode_image(good[: len(good) // 2], max_pixels=10_000_000)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_max_pixels_checked_before_decoding(monkeypatch):
    data = _jpeg(skimage.data.astronaut())  # 512 x 512

    def _no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decode)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, max_pixels=512 * 512 - 1)


def test_decode_maps_pil_bomb_error(monkeypatch):
    data = _jpeg(skimage.data.chelsea())  # skimage itself loads through PIL: encode first
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, max_pixels=10_000_000)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_decode_converts_modes_to_rgb():
    cam = skimage.data.camera()
    gray = decode_image(_png(Image.fromarray(cam)), max_pixels=10_000_000)
    assert gray.shape == (*cam.shape, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], cam) and np.array_equal(gray[..., 1], cam)
    gray[0, 0] = 0  # writable
    rgba = Image.fromarray(skimage.data.astronaut()).convert("RGBA")
    assert decode_image(_png(rgba), max_pixels=10_000_000).shape == (512, 512, 3)
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).convert("CMYK").save(buf, "JPEG")
    assert decode_image(buf.getvalue(), max_pixels=10_000_000).shape == (400, 600, 3)
    deep = Image.fromarray(cam.astype(np.uint16) * 256)
    out = decode_image(_png(deep), max_pixels=10_000_000)
    assert out.shape == (*cam.shape, 3) and out.max() > 200


# ---------------------------------------------------------------- ids, listing, folders


def test_safe_id():
    assert safe_id("sa_1") == "sa_1" and safe_id("../../evil") == "evil"
    for bad in ("", ".", "..", ".hidden", "a b", "x" * 300):
        with pytest.raises(UnsafeIdError):
            safe_id(bad)
    a, b = safe_id("a b", strict=False), safe_id("a_b", strict=False)
    assert a != b and a == safe_id("a b", strict=False) and a.startswith("a_b-")
    assert safe_id("..", strict=False).startswith("id-")


def test_list_shards_dir_of_tars_and_glob(tmp_path, items):
    for name in ("sa_000003.tar", "sa_000001.tar", "sa_000002.tar.gz"):
        write_sa1b_tar(str(tmp_path / name), items[:1])
    (tmp_path / "README.txt").write_text("not a shard")
    (tmp_path / "loose.jpg").write_bytes(items[0][1])  # tars take precedence
    refs = list_shards(str(tmp_path))
    assert [r.shard_id for r in refs] == ["sa_000001", "sa_000002", "sa_000003"]
    assert all(r.kind == "sa1b_tar" and r.uri.startswith("file://") for r in refs)
    assert [r.shard_id for r in list_shards(str(tmp_path), shards_glob="sa_00000[12]")] == [
        "sa_000001",
        "sa_000002",
    ]
    with pytest.raises(SourceError, match="match"):
        list_shards(str(tmp_path), shards_glob="nope*")
    write_sa1b_tar(str(tmp_path / "sa_000001.tgz"), items[:1])
    with pytest.raises(SourceError, match="both map to id"):
        list_shards(str(tmp_path))


def test_list_shards_image_folder_chunks(tmp_path, items):
    folder = tmp_path / "my photos"
    folder.mkdir()
    for i, name in enumerate(["e.JPG", "a.jpg", "c.png", "b.jpeg", "d.webp"]):
        (folder / name).write_bytes(items[i % 3][1])
    (folder / "notes.txt").write_text("x")
    refs = list_shards(str(folder), folder_chunk=2)
    assert len(refs) == 3 and all(r.kind == "image_folder" for r in refs)
    prefix = safe_id("my photos", strict=False)
    assert [r.shard_id for r in refs] == [f"{prefix}-00000", f"{prefix}-00001", f"{prefix}-00002"]
    assert [Path(u).name for r in refs for u in r.members] == ["a.jpg", "b.jpeg", "c.png", "d.webp", "e.JPG"]
    assert refs == list_shards(str(folder), folder_chunk=2)  # deterministic
    got = list(iter_shard(refs[0]))
    assert [(g.image_id, g.annotations, g.width, g.error) for g in got] == [
        ("a", None, None, None),
        ("b", None, None, None),
    ]
    assert got[0].data == items[1][1]
    (folder / "c.png").unlink()  # vanished after listing -> error item, not a crash
    (broken,) = [g for g in iter_image_folder(refs[1]) if g.error]
    assert broken.image_id == "c" and broken.data is None
    (folder / "a.png").write_bytes(items[0][1])
    with pytest.raises(SourceError, match="both map to id 'a'"):
        list_shards(str(folder))


def test_list_shards_user_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no shards in .*empty"):
        list_shards(str(empty))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(SourceError, match="not a tar"):
        list_shards(str(tmp_path / "x.txt"))
    with pytest.raises(SourceError, match="known kinds: image_folder, sa1b_tar"):
        iter_shard(ShardRef("x", str(tmp_path), "zip"))  # type: ignore[arg-type]


def test_read_images_subset(tmp_path, items):
    tar = tmp_path / "sa_000001.tar"
    write_sa1b_tar(str(tar), items)
    (ref,) = list_shards(str(tar))
    got = read_images(ref, {"sa_3", "sa_1", "sa_404"})
    assert set(got) == {"sa_1", "sa_3"} and got["sa_3"].data == items[2][1]
    assert read_images(ref, set()) == {}
    folder = tmp_path / "imgs"
    folder.mkdir()
    for stem, jpeg, _ in items:
        (folder / f"{stem}.jpg").write_bytes(jpeg)
    (fref,) = list_shards(str(folder))
    assert {k: v.data for k, v in read_images(fref, {"sa_2"}).items()} == {"sa_2": items[1][1]}
