"""The one walk over an image folder: what ``eval``'s class folders, ``index`` and ``pack`` see.

Rules, the same for every command:

* images are found by suffix (``core.formats.IMAGE_SUFFIXES``), recursively; hidden files and
  folders (``.git``, ``.ipynb_checkpoints``) are left out;
* symlinks to folders are **not followed**, so every folder is walked once: a link loop
  (``dog/uplink -> ..``) would otherwise count every image again (or forever), and a link to ``/``
  would walk the whole disk. They are counted (``FolderListing.folder_links``). The folder the walk
  starts from may itself be a link;
* every other entry with an image suffix is listed, whatever it is: a link to a file, a dangling link,
  a FIFO. Opening it is the sample protocol's job (``data.samples``), which counts it by its reason
  instead of dropping it silently here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.formats import is_image_file

__all__ = ["FolderListing", "list_images"]


@dataclass
class FolderListing:
    """What :func:`list_images` found under a folder."""

    images: list[str] = field(default_factory=list)  # relative paths, '/'-separated, sorted as strings
    ignored: int = 0                                 # visible files without an image suffix
    folder_links: int = 0                            # symlinks to folders, not followed


def list_images(root: str | os.PathLike) -> FolderListing:
    """The image files under ``root`` (see the module docs for the rules), sorted by relative path so
    every run lists them in the same order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    listing = FolderListing()
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed, not entered
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        listing.folder_links += sum(1 for d in links if not d.startswith("."))
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in links]
        base = Path(folder).relative_to(root).as_posix()
        for name in files:
            if name.startswith("."):
                continue
            if is_image_file(name):
                listing.images.append(name if base == "." else f"{base}/{name}")
            else:
                listing.ignored += 1
    listing.images.sort()
    return listing
