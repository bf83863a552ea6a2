"""Writable copies of the hostile-input fixtures, with the cases that cannot ship created here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LATIN1_NAME = os.fsdecode(b"caf\xe9_latin1.jpg")


def build_messy_training_folder(source: Path, root: Path) -> Path:
    """Copy ``train_folder`` to ``root`` and add the TRAIN_FOLDER.tsv [NOT SHIPPED] rows.

    Adds a directory symlink loop, a Latin-1 (non-UTF-8) file name, an empty class folder, and
    a real dangling symlink in place of the shipped regular-file stand-in ``dogs/broken_link.jpg``.

    Args:
        source: the shipped ``train_folder``.
        root: where the copy goes (must not exist).

    Returns:
        The resolved copy.
    """
    shutil.copytree(source, root, symlinks=True)
    for folder, _dirs, files in os.walk(root):  # the shipped copy is read-only
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644)
    os.symlink("..", root / "cats" / "loop_to_train_folder")
    (root / "encoding").mkdir()
    (root / "encoding" / LATIN1_NAME).write_bytes((root / "cats" / "cat_01.jpg").read_bytes())
    (root / "empty_class").mkdir()
    (root / "dogs" / "broken_link.jpg").unlink()
    os.symlink("no_such_dog.jpg", root / "dogs" / "broken_link.jpg")
    return root.resolve()
