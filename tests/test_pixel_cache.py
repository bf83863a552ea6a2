"""The decoded-pixel cache: hits on an unchanged folder, never stale pixels after any change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers import reader
from workers.reader import PixelCache, decode_dataset

MAX_PIXELS = 40_000_000
MAX_BYTES = 20 * 1024 * 1024


def _photo(path: Path, seed: int, size=(80, 60)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        _photo(root / "a" / f"img{i}.png", i)
    shutil.copy(root / "a" / "img0.png", root / "a" / "copy_of_0.png")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


@pytest.fixture
def cache(tmp_path) -> PixelCache:
    return PixelCache(tmp_path / "cache", max_bytes=1 << 30, settle_s=0.0)


def _decode(root: Path, cache: PixelCache | None, size: int = 32):
    return decode_dataset(root, size, MAX_PIXELS, MAX_BYTES, threads=2, cache=cache)


def _same(a, b) -> None:
    assert a.entries == b.entries
    assert [s.to_dict() for s in a.skipped] == [s.to_dict() for s in b.skipped]
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_second_decode_is_a_read_only_memmap_hit_equal_to_a_fresh_decode(folder, cache):
    first = _decode(folder, cache)
    assert first.cache == "stored"
    second = _decode(folder, cache)
    assert second.cache == "hit"
    assert isinstance(second.images, np.memmap)
    assert not second.images.flags.writeable
    fresh = _decode(folder, None)
    assert fresh.cache == "off"
    _same(second, fresh)
    _same(first, fresh)
    reasons = {s.relpath: s.reason for s in second.skipped}
    assert reasons["a/img0.png"] == "duplicate of a/copy_of_0.png"  # sorted scan order
    assert "a/notes.txt" in reasons and reasons[".hidden.png"] == "hidden"


def test_rewritten_file_with_same_size_and_restored_mtime_is_decoded_again(folder, cache):
    target = folder / "a" / "img9.bmp"  # BMP: other pixels, byte for byte the same size
    _photo(target, 1)
    cached = _decode(folder, cache)
    before = target.stat()
    _photo(target, 2)
    # Only the inode change time, which no user can set back, tells the versions apart.
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    after = _decode(folder, cache)
    assert after.cache == "stored"
    fresh = _decode(folder, None)
    _same(after, fresh)
    row = [e.path for e in fresh.entries].index("a/img9.bmp")
    assert not np.array_equal(np.asarray(cached.images[row]), np.asarray(fresh.images[row]))


def test_added_removed_and_replaced_files_change_the_key(folder, cache):
    assert _decode(folder, cache).cache == "stored"
    _photo(folder / "a" / "new.png", 99)
    added = _decode(folder, cache)
    assert added.cache == "stored"
    assert "a/new.png" in [e.path for e in added.entries]
    (folder / "a" / "img1.png").unlink()
    removed = _decode(folder, cache)
    assert removed.cache == "stored"
    assert "a/img1.png" not in [e.path for e in removed.entries]
    _same(removed, _decode(folder, None))
    # Putting the folder back as it was hits the entries stored before (if not pruned).
    assert _decode(folder, cache).cache == "hit"


def test_image_size_and_decoder_are_part_of_the_key(folder, cache, monkeypatch):
    assert _decode(folder, cache, 32).cache == "stored"
    other = _decode(folder, cache, 48)
    assert other.cache == "stored"
    assert other.images.shape[1:] == (48, 48, 3)
    assert _decode(folder, cache, 32).cache == "hit"
    monkeypatch.setattr(reader, "decoder_fingerprint", lambda: "a-newer-decoder")
    assert _decode(folder, cache, 32).cache == "stored"


def test_recently_changed_files_are_not_stored(folder, tmp_path):
    cautious = PixelCache(tmp_path / "cache", max_bytes=1 << 30, settle_s=3600.0)
    result = _decode(folder, cautious)
    assert result.cache == "not_stored"
    assert _decode(folder, cautious).cache == "not_stored"
    _same(result, _decode(folder, None))


def test_damaged_entry_is_removed_and_decoded_again(folder, cache):
    _decode(folder, cache)
    (entry,) = [p for p in cache.folder.iterdir() if not p.name.startswith(".")]
    pixels = entry / reader.PIXELS
    pixels.write_bytes(pixels.read_bytes()[:200])  # cut short, as by a full disk
    again = _decode(folder, cache)
    assert again.cache == "stored"
    _same(again, _decode(folder, None))
    assert _decode(folder, cache).cache == "hit"


def test_budget_keeps_the_most_recently_used_entries(folder, tmp_path):
    one_entry = 4 * 32 * 32 * 3 + 2048  # the 32 px decode of 4 images, header and manifest
    small = PixelCache(tmp_path / "cache", max_bytes=one_entry, settle_s=0.0)
    assert _decode(folder, small, 32).cache == "stored"
    assert _decode(folder, small, 16).cache == "stored"
    entries = [p for p in small.folder.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # the 32 px entry made room
    assert _decode(folder, small, 16).cache == "hit"
    assert _decode(folder, small, 32).cache == "stored"
    too_big = PixelCache(tmp_path / "tiny", max_bytes=100, settle_s=0.0)
    assert _decode(folder, too_big, 32).cache == "not_stored"


def test_zero_budget_disables_the_cache(folder, tmp_path):
    off = PixelCache(tmp_path / "cache", max_bytes=0)
    assert _decode(folder, off).cache == "off"
    assert not (tmp_path / "cache").exists()
