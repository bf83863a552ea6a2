"""Labels for evaluation: the path,class CSV and the first-folder rule."""

from __future__ import annotations

import pytest

from shared.labels import (
    LabelResolver,
    LabelsError,
    folder_label,
    normalise_relpath,
    read_labels_csv,
)


def test_csv_with_extra_columns_bom_and_blank_lines(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffid,Path,CLASS\n1,cat/a.jpg,cat\n\n2,./dog//b.jpg, dog \n".encode())
    assert read_labels_csv(path) == {"cat/a.jpg": "cat", "dog/b.jpg": "dog"}


@pytest.mark.parametrize(("text", "message"), [
    ("cat/a.jpg,cat\n", "header"),
    ("path,label\ncat/a.jpg,cat\n", "header"),
    ("path,class\ncat/a.jpg\n", "line 2: too few columns"),
    ("path,class\n/etc/passwd,cat\n", "line 2"),
    ("path,class\n../a.jpg,cat\n", "line 2"),
    ("path,class\ncat/a.jpg,\n", "line 2"),
    ("path,class\n", "lists no image"),
    ("", "header"),
])
def test_bad_csv_is_refused_saying_where(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(LabelsError) as info:
        read_labels_csv(path)
    assert info.value.code == "invalid_labels" and message in info.value.message


def test_too_large_and_not_utf8(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,class\ncat/a.jpg,cat\n")
    with pytest.raises(LabelsError) as info:
        read_labels_csv(path, max_bytes=10)
    assert info.value.code == "labels_too_large"
    path.write_bytes(b"path,class\n\xff\xfe,cat\n")
    with pytest.raises(LabelsError) as info:
        read_labels_csv(path)
    assert info.value.code == "invalid_labels"


def test_relpaths_and_folder_labels():
    assert normalise_relpath(" a\\b.jpg ") == "a/b.jpg"
    assert normalise_relpath("a/../b.jpg") is None
    assert folder_label("cat/x.jpg") == "cat"
    assert folder_label("cat/deep/x.jpg") == "cat"
    assert folder_label("x.jpg") is None


def test_resolver_prefers_the_csv_and_falls_back_to_the_folder(tmp_path):
    data = tmp_path / "data"
    resolver = LabelResolver({"set/cat/a.jpg": "tabby"}, data)
    assert resolver.label(data / "set", "cat/a.jpg") == "tabby"
    assert resolver.label(data / "set", "cat/b.jpg") == "cat"
    assert resolver.label(tmp_path / "elsewhere", "cat/a.jpg") == "cat"
    assert resolver.label(data / "set", "top.jpg") is None
    assert LabelResolver().label(data, "dog/a.jpg") == "dog"
