"""``data.folders.list_images``: the one walk of eval's class folders, ``index`` and ``pack``."""

from __future__ import annotations

import os

import pytest

from ldmclip.data.folders import list_images


def test_folders_are_walked_once_and_links_to_folders_are_not_followed(tmp_path):
    root = tmp_path / "images"
    (root / "dog" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (root / "dog" / "a.jpg", root / "dog" / "sub" / "b.PNG", root / ".hidden" / "c.jpg",
                 root / "dog" / ".d.jpg", outside / "e.jpg"):
        path.write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    os.symlink("..", root / "dog" / "uplink")            # a loop
    os.symlink(outside, root / "dog" / "elsewhere")      # a folder outside the tree
    os.symlink("../nowhere.jpg", root / "dog" / "gone.jpg")  # dangling: listed, counted when opened
    os.symlink("a.jpg", root / "dog" / "alias.jpg")      # a link to a file is a file
    os.mkfifo(root / "dog" / "pipe.jpg")                 # listed, never opened here

    listing = list_images(root)
    assert listing.images == ["dog/a.jpg", "dog/alias.jpg", "dog/gone.jpg", "dog/pipe.jpg", "dog/sub/b.PNG"]
    assert listing.folder_links == 2 and listing.ignored == 1
    assert list_images(root / "dog" / "uplink").images == listing.images  # the starting folder may be a link


def test_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "nope")
