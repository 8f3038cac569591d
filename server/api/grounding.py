"""Boxes and points in an answer, mapped back to the customer's own photo.

Qwen3-VL writes grounding coordinates in a 0-1000 frame relative to the image it saw (the
photo resized to its pixel budget, aspect ratio nearly kept).  With ``"grounding": true``
in a chat request, each assistant message (each choice) gets a ``grounding`` field
(``protocol.Grounding``) that lists the request's images (their original size after EXIF
orientation, the size the model saw, their tokens) and every box and point found in the
message content, each with its 0-1000 values as written and its pixels in the original:

    x_px = round(x / 1000 * W),  y_px = round(y / 1000 * H)

(Python's ``round``: halves to even), clamped to ``0..W`` and ``0..H``, W x H the original
photo after EXIF orientation.  The content itself is never changed; tool-call arguments
are not scanned.

Forms found (``find``), in order of appearance:
* Qwen's JSON: ``{"bbox_2d": [x1, y1, x2, y2], "label": "cup"}`` and
  ``{"point_2d": [x, y], "label": ...}``, in any surrounding text (a fenced block, a list,
  an object cut short by ``max_tokens``); the label is looked for in the same object;
* the text form ``<|object_ref_start|>cup<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  (the label part optional).

Which image: the model's coordinates name none, so every item refers to the **last image
of the request** (the one a question about "this photo" is asked after); with no image in
the request, items are listed with ``image``, ``bbox_px`` / ``point_px`` null.

Near-linear in the content's length: one regex pass per form; a match's object is found by
bisection over the brace positions and each object searched for its label once.  No torch here (the HTTP layer's side).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction

from server.api import protocol as p

_NUM = r"(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
_SEP = r"\s*,\s*"
_JSON_BOX = re.compile(r'"bbox_2d"\s*:\s*\[\s*' + _SEP.join([_NUM] * 4) + r"\s*\]")
_JSON_POINT = re.compile(r'"point_2d"\s*:\s*\[\s*' + _NUM + _SEP + _NUM + r"\s*\]")
_LABEL = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')
_TEXT_BOX = re.compile(r"<\|box_start\|>\s*\(\s*" + _NUM + _SEP + _NUM + r"\s*\)" + _SEP
                       + r"\(\s*" + _NUM + _SEP + _NUM + r"\s*\)\s*<\|box_end\|>")
_REF_END = "<|object_ref_end|>"
_REF_START = "<|object_ref_start|>"
MAX_ITEMS = 1000  # per message: an answer of 64k characters holds ~2k at most


@dataclass
class Found:
    kind: str                    # "bbox" | "point"
    values: list[int | float]    # as written, 0-1000
    label: str | None
    at: int                      # offset in the text (the order)


def _number(s: str) -> int | float:
    """A coordinate as written: an int when it is one (a short one: ``int()`` of a
    5,000-digit string is refused by Python), else a float (possibly inf)."""
    if len(s) <= 20 and re.fullmatch(r"-?\d+", s):
        return int(s)
    return float(s)


class _Objects:
    """The JSON object around a position: from the nearest ``{`` before it to the nearest
    ``}`` after it (the end of the text for one cut short), found by bisection over the
    brace positions, each object's label looked up once."""

    def __init__(self, text: str):
        self.text = text
        self.opens = [m.start() for m in re.finditer(r"\{", text)]
        self.closes = [m.start() for m in re.finditer(r"\}", text)]
        self.labels: dict[tuple[int, int], str | None] = {}

    def label(self, start: int, end: int) -> str | None:
        i = bisect.bisect_left(self.opens, start) - 1
        if i < 0:
            return None
        j = bisect.bisect_left(self.closes, end)
        span = (self.opens[i], self.closes[j] if j < len(self.closes) else len(self.text))
        if span not in self.labels:
            m = _LABEL.search(self.text, *span)
            self.labels[span] = None if m is None else _unquote(m.group(1))
        return self.labels[span]


def _unquote(s: str) -> str:
    try:
        return json.loads('"' + s + '"')
    except ValueError:
        return s


def _text_label(text: str, start: int, lo: int) -> str | None:
    end = text.rfind(_REF_END, lo, start)
    if end < 0 or text[end + len(_REF_END): start].strip():
        return None
    begin = text.rfind(_REF_START, lo, end)
    return None if begin < 0 else text[begin + len(_REF_START): end]


def find(text: str) -> list[Found]:
    """Every box and point in ``text``, in order (at most ``MAX_ITEMS``)."""
    objects = _Objects(text)
    out: list[Found] = []
    for kind, form in (("bbox", _JSON_BOX), ("point", _JSON_POINT)):
        for m in form.finditer(text):
            out.append(Found(kind, [_number(g) for g in m.groups()],
                             objects.label(m.start(), m.end()), m.start()))
    prev = 0
    for m in _TEXT_BOX.finditer(text):
        out.append(Found("bbox", [_number(g) for g in m.groups()],
                         _text_label(text, m.start(), prev), m.start()))
        prev = m.end()
    out.sort(key=lambda f: f.at)
    return out[:MAX_ITEMS]


def to_pixel(v: int | float, size: int) -> int:
    """A 0-1000 coordinate in pixels of a side of ``size``, clamped to ``0..size``: the
    product in exact arithmetic (a float one would round 700 / 1000 * 85 = 59.49999...
    down, where the exact 59.5 goes to the even 60)."""
    if not math.isfinite(v):
        return size if v > 0 else 0
    return min(max(round(Fraction(v) * size / 1000), 0), size)


def ground(text: str, images: list[p.GroundingImage]) -> p.Grounding:
    """The ``grounding`` field of a message whose content is ``text``."""
    last = images[-1] if images else None
    boxes, points = [], []
    for f in find(text):
        px = None
        if last is not None:
            sides = [last.width, last.height] * 2
            px = [to_pixel(v, s) for v, s in zip(f.values, sides)]
        idx = last.index if last is not None else None
        if f.kind == "bbox":
            boxes.append(p.GroundingBox(image=idx, label=f.label, bbox_2d=f.values, bbox_px=px))
        else:
            points.append(p.GroundingPoint(image=idx, label=f.label, point_2d=f.values,
                                           point_px=px))
    return p.Grounding(images=images, boxes=boxes, points=points)
