"""Prompt templates and class names for zero-shot classification.

The templates are data, not code: format strings with one ``{}`` for the class name. Each built-in
template is a :class:`Template`, a ``str`` that can also be called with the class name, so the same
tuples are OpenCLIP's callables (``OPENAI_IMAGENET_TEMPLATES[0]("cat")``) and plain format strings.
Template files may write the class name as ``{}`` or as ``{c}`` (OpenCLIP / CLIP_benchmark style).

* ``OPENAI_IMAGENET_TEMPLATES``: the 80 ImageNet prompts of the CLIP paper (Radford et al. 2021),
  from OpenAI's notebook
  https://github.com/openai/CLIP/blob/main/notebooks/Prompt_Engineering_for_ImageNet.ipynb (MIT),
  in the order OpenCLIP 3.3.0 lists them (``open_clip/zero_shot_metadata.py``,
  ``OPENAI_IMAGENET_TEMPLATES``). The order matters only for bit-level float equality: the class
  embedding is a mean over templates.
* ``SIMPLE_IMAGENET_TEMPLATES``: the 7-prompt subset the same notebook selects, as OpenCLIP lists it
  (``SIMPLE_IMAGENET_TEMPLATES``).
* ImageNet-1k class names: OpenAI's curated names, shipped as ``imagenet_classnames.txt`` (same
  sources; see the comment at the top of that file).
"""

from __future__ import annotations

import os
import string
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..core.errors import UserError

__all__ = ["IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES", "BUILTIN_TEMPLATES",
           "Template", "imagenet_classnames", "load_templates", "read_lines"]


class Template(str):
    """A prompt template: a format string with one ``{}``, and a callable ``template(classname)`` like
    OpenCLIP's lambdas (``isinstance(t, str)`` stays true, so OpenCLIP's ``build_zero_shot_classifier``
    formats it, with the same prompt)."""

    __slots__ = ()

    def __call__(self, classname: str) -> str:
        return self.format(classname)

OPENAI_IMAGENET_TEMPLATES: tuple[Template, ...] = tuple(map(Template, (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)))

SIMPLE_IMAGENET_TEMPLATES: tuple[Template, ...] = tuple(map(Template, (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)))

# Names accepted by ``load_templates`` (and ``ldmclip eval --templates``).
BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
}


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; lines starting with ``#`` are comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def load_templates(spec: str | os.PathLike) -> list[str]:
    """Templates by built-in name (``openai``: 80 prompts, ``simple``: 7) or from a text file with one
    template per line, each containing ``{}`` (or ``{c}``, OpenCLIP / CLIP_benchmark style) where the
    class name goes (``#`` lines are comments); ``{c}`` lines come back written with ``{}``.

    A file line without the class name (or with other braces) is an error rather than a prompt that
    silently ignores the class name."""
    if str(spec) in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[str(spec)])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"templates: {spec!r} is neither a built-in set ({', '.join(BUILTIN_TEMPLATES)}) "
                                "nor a file")
    templates = read_lines(path, "templates file")
    if not templates:
        raise UserError(f"templates file {path} has no templates")
    out = []
    for number, template in enumerate(templates, 1):
        try:
            template = _positional(template)
            filled = template.format("\0")
        except (IndexError, KeyError, ValueError):
            filled = ""
        if filled.count("\0") != 1:
            raise UserError(f"templates file {path}: template {number} ({template!r}) must contain exactly one "
                            "'{}' (or '{c}') for the class name and no other braces (write '{{' for a literal brace)")
        out.append(template)
    return out


def _positional(template: str) -> str:
    """``template`` with a ``{c}`` field written ``{}`` (other fields and literal braces as they were)."""
    if "{c" not in template:
        return template
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            parts.append("{" + ("" if field == "c" else field) + (f"!{conversion}" if conversion else "")
                         + (f":{spec}" if spec else "") + "}")
    return "".join(parts)


@lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    text = (resources.files("ldmclip") / "eval" / "imagenet_classnames.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet-1k class names in class-index order (OpenAI's curated names)."""
    return list(_imagenet())


IMAGENET_CLASSNAMES: tuple[str, ...] = _imagenet()  # OpenCLIP's name for the same 1,000 names
