"""shared.datasets against the messy training folder of TRAIN_FOLDER.tsv and path escapes.

The shipped ``train_folder/`` is copied to a tmp dir, then the [NOT SHIPPED] rows are created
there: a directory symlink loop, a Latin-1 (non-UTF-8) file name, an empty class folder, and a
real dangling symlink in place of the shipped regular-file stand-in ``dogs/broken_link.jpg``.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from shared.datasets import (
    Candidate,
    DatasetError,
    Skipped,
    canonical_name,
    display_name,
    iter_dataset,
    resolve_dataset,
)
from shared.images import ImageDecodeError, decode_image, load_for_model, read_file_bytes
from tests.fixture_folders import LATIN1_NAME, build_messy_training_folder

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("IMGSIM_TEST_FIXTURES", REPO.parent / "shared" / "fixtures" / "bad_inputs")
)
MAX_PIXELS = 40_000_000
MAX_BYTES = 10_000_000
LATIN1_SHOWN = "caf\\xe9_latin1.jpg"  # the manifest writes the byte as the text \xe9
# Candidates at scan level that the decoder must refuse (formats are decided by content).
DECODER_REJECTS = {"dogs/notes.txt", "dogs/empty.jpg", "dogs/truncated.jpg", "dogs/not_really.jpg"}


def _train_rows() -> list[dict[str, str]]:
    path = FIXTURES / "TRAIN_FOLDER.tsv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


ROWS = _train_rows()


def _rel(row: dict[str, str]) -> str:
    """The row's path relative to train_folder, without a trailing slash."""
    return row["file"].removeprefix("train_folder/").rstrip("/")


# The Latin-1 row ("\\xe9" in the manifest) may be included or skipped; it is checked apart.
INCLUDED = [
    _rel(row)
    for row in ROWS
    if row["expected_behaviour"].startswith("training scan includes it")
    and "\\x" not in row["file"]
]


@pytest.fixture
def train_root(tmp_path: Path) -> Path:
    """A writable copy of train_folder with the [NOT SHIPPED] cases created in it."""
    source = FIXTURES / "train_folder"
    if not source.is_dir():
        pytest.fail(f"training-folder fixture missing: {source}")
    return build_messy_training_folder(source, tmp_path / "data" / "train_folder")


def _scan(root: Path, budget_s: float = 5.0) -> list[Candidate | Skipped]:
    """list(iter_dataset(root)) in a thread, failing instead of hanging on a loop."""
    out: list[Candidate | Skipped] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for item in iter_dataset(root):
                out.append(item)
                if len(out) > 10_000:
                    raise AssertionError("scan produced over 10 000 items: following a loop?")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(budget_s)
    assert not thread.is_alive(), f"iter_dataset still running after {budget_s}s"
    if errors:
        raise errors[0]
    assert time.monotonic() - started < budget_s
    return out


def _candidates(items) -> dict[str, Candidate]:
    return {item.relpath: item for item in items if isinstance(item, Candidate)}


def _skipped(items) -> dict[str, str]:
    return {item.relpath: item.reason for item in items if isinstance(item, Skipped)}


# --------------------------------------------------------------------------- the manifest


def test_manifest_rows_are_present_and_classified():
    assert ROWS, f"no TRAIN_FOLDER.tsv rows under {FIXTURES}"
    assert len(INCLUDED) >= 25, INCLUDED
    for row in ROWS:
        text = row["expected_behaviour"]
        assert (
            text.startswith("training scan includes it")
            or text.startswith("training scan skips it")
            or text.startswith("not opened as a file")
            or text.startswith("scan terminates quickly")
            or text.startswith("counted once")
            or text.startswith("ignored with a warning")
        ), f"decide what the scan should do for {row['file']}: {text}"


def test_manifest_holds_both_cafe_spellings():
    names = {_rel(row) for row in ROWS if "café" in unicodedata.normalize("NFC", row["file"])}
    assert "unicode_names/caf\u00e9.jpg" in names
    assert "unicode_names/cafe\u0301.jpg" in names


def test_fixture_copy_has_the_runtime_cases(train_root):
    assert os.path.islink(train_root / "cats" / "loop_to_train_folder")
    assert os.path.islink(train_root / "dogs" / "broken_link.jpg")
    assert not (train_root / "dogs" / "broken_link.jpg").exists()
    assert os.listdir(os.fsencode(train_root / "encoding")) == [b"caf\xe9_latin1.jpg"]
    assert os.listdir(train_root / "empty_class") == []


# --------------------------------------------------------------------------- the scan


def test_scan_terminates_quickly_and_counts_nothing_twice(train_root):
    started = time.monotonic()
    items = _scan(train_root)
    assert time.monotonic() - started < 2.0
    relpaths = [item.relpath for item in items]
    assert len(relpaths) == len(set(relpaths)), "an entry was yielded twice"
    real_files = {os.path.realpath(c.path) for c in _candidates(items).values()}
    assert len(real_files) == len(_candidates(items)), "one file reached by two paths"
    assert not any("loop_to_train_folder/" in path for path in relpaths)


@pytest.mark.parametrize("relpath", INCLUDED)
def test_every_included_row_is_a_candidate(train_root, relpath):
    candidates = _candidates(_scan(train_root))
    assert relpath in candidates, sorted(candidates)
    candidate = candidates[relpath]
    assert candidate.path == train_root / relpath
    assert candidate.path.is_file()


def test_included_images_decode_to_model_input(train_root):
    candidates = _candidates(_scan(train_root))
    for relpath in INCLUDED:
        data = read_file_bytes(candidates[relpath].path, MAX_BYTES)
        pixels = load_for_model(data, 32, MAX_PIXELS)
        assert pixels.shape == (32, 32, 3), relpath


def test_cafe_nfc_and_nfd_are_two_distinct_candidates(train_root):
    candidates = _candidates(_scan(train_root))
    nfc, nfd = "unicode_names/caf\u00e9.jpg", "unicode_names/cafe\u0301.jpg"
    assert nfc in candidates and nfd in candidates
    assert candidates[nfc].path != candidates[nfd].path
    assert candidates[nfc].path.read_bytes() != candidates[nfd].path.read_bytes()


def test_directory_named_like_an_image_is_walked_not_opened(train_root):
    items = _scan(train_root)
    assert "cats/dir_named_like_image.jpg" not in _candidates(items)
    assert "cats/dir_named_like_image.jpg/cat_09.jpg" in _candidates(items)


@pytest.mark.parametrize(
    ("relpath", "reason"),
    [
        (".DS_Store", "hidden"),
        (".ipynb_checkpoints", "hidden"),
        ("dogs/._dog_01.png", "hidden"),
        ("dogs/broken_link.jpg", "broken link"),
        (f"encoding/{LATIN1_SHOWN}", "undecodable file name"),
        ("empty_class", "empty folder"),
        ("cats/loop_to_train_folder", "directory symlink not followed"),
    ],
)
def test_skipped_entries_carry_a_reason(train_root, relpath, reason):
    skipped = _skipped(_scan(train_root))
    assert skipped.get(relpath) == reason, skipped


def test_hidden_folder_is_not_scanned_and_not_a_class(train_root):
    relpaths = [item.relpath for item in _scan(train_root)]
    assert not any(path.startswith(".ipynb_checkpoints/") for path in relpaths)


def test_folder_holding_only_a_skipped_file_is_not_called_empty(train_root):
    skipped = _skipped(_scan(train_root))
    assert "encoding" not in skipped, skipped


def test_folder_holding_only_hidden_files_is_empty(train_root):
    (train_root / "mac_class").mkdir()
    (train_root / "mac_class" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert _skipped(_scan(train_root)).get("mac_class") == "empty folder"


def test_skip_report_is_printable_and_json_safe(train_root):
    for item in _scan(train_root):
        text = json.dumps(item.to_dict() if isinstance(item, Skipped) else item.relpath)
        text.encode("utf-8")  # no lone surrogates anywhere
    assert display_name(LATIN1_NAME) == LATIN1_SHOWN


def test_latin1_file_is_never_a_candidate(train_root):
    candidates = _candidates(_scan(train_root))
    assert not [path for path in candidates if path.startswith("encoding/")]


@pytest.mark.parametrize("relpath", sorted(DECODER_REJECTS))
def test_scan_level_candidates_are_rejected_by_the_decoder(train_root, relpath):
    candidates = _candidates(_scan(train_root))
    assert relpath in candidates
    data = read_file_bytes(candidates[relpath].path, MAX_BYTES)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, MAX_PIXELS)
    assert 400 <= info.value.http_status < 500
    assert info.value.code in {"empty_file", "not_an_image", "truncated_image", "corrupt_image"}


def test_duplicate_bytes_are_two_candidates_with_equal_content(train_root):
    """Dedupe is by content hash after the scan; the scan itself reports both files."""
    candidates = _candidates(_scan(train_root))
    a, b = candidates["dogs/dog_01.png"], candidates["dogs/dog_01_duplicate.png"]
    assert a.path.read_bytes() == b.path.read_bytes()


def test_file_link_out_of_the_dataset_is_skipped(train_root, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((train_root / "cats" / "cat_01.jpg").read_bytes())
    os.symlink(outside, train_root / "cats" / "leak.jpg")
    os.symlink("cat_01.jpg", train_root / "cats" / "alias.jpg")
    items = _scan(train_root)
    assert _skipped(items)["cats/leak.jpg"] == "link points outside the dataset"
    assert "cats/alias.jpg" in _candidates(items)


def test_self_loop_and_fifo_are_skipped(train_root):
    os.symlink("self.jpg", train_root / "dogs" / "self.jpg")
    os.mkfifo(train_root / "dogs" / "pipe.jpg")
    skipped = _skipped(_scan(train_root))
    assert skipped["dogs/self.jpg"] == "broken link"
    assert skipped["dogs/pipe.jpg"] == "not a regular file"


def test_deep_nesting_does_not_recurse(tmp_path):
    root = tmp_path / "deep"
    folder = root
    for _ in range(300):  # deeper than anyone should nest, well inside PATH_MAX
        folder = folder / "d"
    folder.mkdir(parents=True)
    (folder / "x.jpg").write_bytes(b"x")
    items = _scan(root.resolve())
    assert [c.relpath.count("/") for c in _candidates(items).values()] == [300]


def test_unreadable_root_is_reported_not_raised(tmp_path):
    items = _scan((tmp_path / "missing").resolve())
    assert [(item.relpath, type(item)) for item in items] == [(".", Skipped)]
    assert items[0].reason.startswith("unreadable folder")


# --------------------------------------------------------------------------- resolve_dataset


@pytest.fixture
def data_root(train_root: Path) -> Path:
    return train_root.parent


def test_relative_path_inside_root(data_root):
    assert resolve_dataset(data_root, "train_folder") == data_root / "train_folder"
    assert resolve_dataset(data_root, "train_folder/cats") == data_root / "train_folder" / "cats"


def test_absolute_path_inside_root(data_root):
    target = data_root / "train_folder" / "dogs"
    assert resolve_dataset(data_root, str(target)) == target


def test_dotdot_that_stays_inside_is_allowed(data_root):
    resolved = resolve_dataset(data_root, "train_folder/cats/../dogs")
    assert resolved == data_root / "train_folder" / "dogs"


@pytest.mark.parametrize(
    "dataset", ["..", "../..", "train_folder/../../", "train_folder/../../etc", "/etc", "/"]
)
def test_escape_is_refused(data_root, dataset):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, dataset)
    assert info.value.code == "dataset_outside_data_root"


def test_symlink_inside_root_pointing_outside_is_refused(data_root, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, data_root / "sneaky")
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, "sneaky")
    assert info.value.code == "dataset_outside_data_root"


def test_loop_inside_train_folder_resolves_inside(data_root):
    # cats/loop_to_train_folder -> .. : resolves to train_folder itself, which is inside.
    resolved = resolve_dataset(data_root, "train_folder/cats/loop_to_train_folder")
    assert resolved == data_root / "train_folder"


def test_missing_folder(data_root):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, "no_such_folder")
    assert info.value.code == "dataset_not_found"


def test_missing_folder_outside_root_does_not_reveal_existence(data_root):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, "../no_such_folder")
    assert info.value.code == "dataset_outside_data_root"


def test_a_file_is_not_a_folder(data_root):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, "train_folder/cats/cat_01.jpg")
    assert info.value.code == "dataset_not_a_folder"


@pytest.mark.parametrize("dataset", ["", "   ", "\t\n", "train\x00folder"])
def test_empty_or_nul_is_invalid(data_root, dataset):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, dataset)
    assert info.value.code == "invalid_dataset"


def test_non_string_is_invalid(data_root):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, None)  # type: ignore[arg-type]
    assert info.value.code == "invalid_dataset"


@pytest.mark.parametrize("kind", ["self-loop", "two-link-loop", "name-too-long"])
def test_unresolvable_paths_are_dataset_errors(data_root, kind):
    if kind == "self-loop":
        os.symlink("loop", data_root / "loop")
        dataset = "loop"
    elif kind == "two-link-loop":
        os.symlink("b", data_root / "a")
        os.symlink("a", data_root / "b")
        dataset = "a/sub"
    else:
        dataset = "x" * 5000
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, dataset)
    assert info.value.code in {"invalid_dataset", "dataset_not_found"}
    json.dumps({"error": info.value.message})


def test_dangling_symlink_inside_root_is_not_found(data_root):
    os.symlink("gone", data_root / "dangling")
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, "dangling")
    assert info.value.code == "dataset_not_found"


def test_resolved_dataset_scans_the_same(data_root):
    root = resolve_dataset(data_root, "train_folder")
    assert stat.S_ISDIR(root.stat().st_mode)
    assert _candidates(_scan(root))


# --------------------------------------------------------------------------- display_name


def test_display_name_bounds_and_quotes_what_it_is_given():
    assert display_name("a" * 300, 10) == "a" * 10 + "\u2026 (300 characters)"
    assert display_name("a" * 300, 10, quote=True) == repr("a" * 10) + "\u2026 (300 characters)"
    assert display_name("short", 10, quote=True) == "'short'"
    assert display_name("x" * 5000) == "x" * 5000  # no limit: file names in scan reports
    # Undecodable bytes from the disk and lone surrogates from JSON stay printable, JSON-safe.
    assert display_name("caf\udce9") == "caf\\xe9"
    assert display_name("a\ud800", 10) == "a\\ud800"
    json.dumps(display_name("a\ud800" * 300, 100, quote=True), ensure_ascii=False).encode()


@pytest.mark.parametrize("kind", ["not-found", "not-a-folder", "too-long"])
def test_dataset_errors_quote_the_name_bounded(data_root, kind):
    name = {"not-found": "n" * 100_000, "not-a-folder": "train_folder/cats/cat_01.jpg",
            "too-long": "x/" * 50_000}[kind]
    with pytest.raises(DatasetError) as info:
        resolve_dataset(data_root, name)
    assert len(info.value.message) < 400
    if len(name) > 200:
        assert f"\u2026 ({len(name):,} characters)" in info.value.message
    else:
        assert repr(name) in info.value.message


@pytest.mark.parametrize(("typed", "canonical"), [
    ("train_folder", "train_folder"),
    ("train_folder/cats/../dogs/", "train_folder/dogs"),
    ("./train_folder//cats", "train_folder/cats"),
    ("train_folder/..", "."),
    ("train_folder/cats/loop_to_train_folder", "train_folder"),
])
def test_canonical_name_is_relative_to_the_root_and_resolves_to_the_same_folder(
        data_root, typed, canonical):
    resolved = resolve_dataset(data_root, typed)
    assert canonical_name(data_root, resolved) == canonical
    assert resolve_dataset(data_root, canonical) == resolved  # what a worker does with it
    assert canonical_name(data_root, resolve_dataset(data_root, str(resolved))) == canonical
