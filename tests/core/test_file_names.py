"""File names are bytes: ``core.formats.name_to_text`` / ``text_to_name`` carry any name through JSON."""

from __future__ import annotations

import json
import os
import random

from ldmclip.core.formats import name_bytes, name_to_text, text_to_name


def test_a_name_that_is_not_utf8_becomes_valid_text_and_comes_back():
    name = os.fsdecode(b"photos/caf\xe9.jpg")  # how Python hands over a Latin-1 name on Linux
    text = name_to_text(name)
    assert text == "photos/caf\\xe9.jpg"
    assert json.loads(json.dumps(text, ensure_ascii=False).encode("utf-8")) == text  # any JSON writer takes it
    assert text_to_name(text) == name and name_bytes(text_to_name(text)) == b"photos/caf\xe9.jpg"


def test_valid_names_are_unchanged_and_every_name_round_trips():
    for name in ["café.jpg", "new\nline.png", "a\\b.jpg", "日本/画像.png", ""]:
        assert name_to_text(name) == name and text_to_name(name) == name
    # Backslashes next to undecodable bytes or to text that reads like an escape: still exact.
    rng = random.Random(0)
    pieces = [b"\\", b"x", b"8", b"f", b"0", b"a", b"\xe9", b"\xc3", b"\xa9", b"/"]
    for _ in range(20000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        text = name_to_text(os.fsdecode(raw))
        text.encode("utf-8")  # valid Unicode: no lone surrogate left
        assert name_bytes(text_to_name(text)) == raw, raw
