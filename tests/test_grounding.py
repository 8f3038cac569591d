"""Issue 32 point 1: boxes and points mapped back to the customer's own photo.

Unit tests of the forms ``server.api.grounding`` finds and of the pixel formula, of the
original size ``server.api.media`` keeps (EXIF orientation, reduced-scale decodes); then end to
end on the shared server through the ``openai`` SDK: a ``json_schema`` response format
makes the random model write ``bbox_2d`` / ``point_2d`` numbers, and each must come back
mapped by the formula onto a non-square photo and an EXIF-rotated one, plain and streamed,
with the content byte-identical to the same request without the option.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from server.api import grounding as g
from server.api import protocol as p
from server.api.media import MediaPolicy, decode_image_bytes, original_size
from tests.conftest import data_url

COORD = {"type": "integer", "minimum": 0, "maximum": 1000}
SCHEMA = {"type": "object", "properties": {
    "bbox_2d": {"type": "array", "items": COORD, "minItems": 4, "maxItems": 4},
    "point_2d": {"type": "array", "items": COORD, "minItems": 2, "maxItems": 2},
    "label": {"type": "string", "maxLength": 6}},
    "required": ["bbox_2d", "point_2d", "label"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "where", "schema": SCHEMA}}


def px(v, side):
    """The documented formula, written out independently of the server's."""
    return min(max(round(v / 1000 * side), 0), side)


# --------------------------------------------------------------------------- forms

def test_json_forms_with_labels_in_any_text():
    text = ('Found them:\n```json\n[\n  {"bbox_2d": [10, 20, 500, 1000], "label": "cup \\"A\\""},'
            '\n  {"label": "lid", "point_2d": [1000, 0]},\n  {"point_2d": [3.5, 7], '
            '"bbox_2d": [1, 2, 3, 4]}\n]\n```')
    found = [(f.kind, f.values, f.label) for f in g.find(text)]
    assert found == [("bbox", [10, 20, 500, 1000], 'cup "A"'), ("point", [1000, 0], "lid"),
                     ("point", [3.5, 7], None), ("bbox", [1, 2, 3, 4], None)]


def test_an_object_cut_short_still_counts():
    text = '[{"bbox_2d": [100, 200, 300, 400], "label": "sho'
    assert [(f.values, f.label) for f in g.find(text)] == [([100, 200, 300, 400], None)]
    text = '{"label": "shoe", "bbox_2d": [1, 2, 3, 4], "point_2d": [5'
    assert [(f.kind, f.label) for f in g.find(text)] == [("bbox", "shoe")]


def test_text_form_with_and_without_a_label():
    text = ("The <|object_ref_start|>red mug<|object_ref_end|><|box_start|>(12,34),(560,789)"
            "<|box_end|> and <|box_start|>( 1 , 2 ),( 3 , 4 )<|box_end|>.")
    assert [(f.values, f.label) for f in g.find(text)] == [
        ([12, 34, 560, 789], "red mug"), ([1, 2, 3, 4], None)]


def test_no_false_forms():
    for text in ("bbox_2d [1, 2, 3, 4]", '"bbox_2d": [1, 2, 3]', '"point_2d": ["a", "b"]',
                 "<|box_start|>(1,2)<|box_end|>", ""):
        assert g.find(text) == [], text


def test_pixel_formula_and_clamping():
    assert g.to_pixel(500, 641) == round(320.5) == 320       # Python's round: half to even
    assert g.to_pixel(700, 85) == 60   # exactly 59.5 (in floats 700 / 1000 * 85 = 59.4999...)
    assert g.to_pixel(1000, 641) == 641 and g.to_pixel(0, 641) == 0
    assert g.to_pixel(-40, 300) == 0 and g.to_pixel(1200, 300) == 300
    assert g.to_pixel(float("inf"), 300) == 300 and g.to_pixel(float("-inf"), 300) == 0
    assert g.to_pixel(float("1" + "0" * 5000), 300) == 300   # a 5000-digit number
    huge = '{"bbox_2d": [1' + "0" * 5000 + ', 0, 0, 0]}'
    assert g.find(huge)[0].values[0] == float("inf")


def test_ground_refers_to_the_last_image():
    imgs = [p.GroundingImage(index=0, width=100, height=100, model_width=96, model_height=96,
                             image_tokens=9),
            p.GroundingImage(index=1, width=1200, height=300, model_width=1184,
                             model_height=288, image_tokens=333)]
    out = g.ground('{"bbox_2d": [250, 500, 750, 1000]} {"point_2d": [1, 999]}', imgs)
    assert out.boxes[0].image == 1 and out.boxes[0].bbox_px == [300, 150, 900, 300]
    assert out.points[0].point_px == [px(1, 1200), px(999, 300)]
    alone = g.ground('{"bbox_2d": [1, 2, 3, 4]}', [])
    assert alone.boxes[0].image is None and alone.boxes[0].bbox_px is None


def test_streamed_grounding_keeps_its_nulls():
    """A chunk is written without null fields; its grounding is written as the message's."""
    out = g.ground('{"bbox_2d": [1, 2, 3, 4]}', [])
    chunk = p.ChatCompletionChunk(id="c", created=0, model="m", choices=[
        p.ChunkChoice(index=0, delta=p.Delta(grounding=out), finish_reason="stop")])
    streamed = json.loads(p.chunk_json(chunk))["choices"][0]["delta"]["grounding"]
    plain = json.loads(p.ResponseMessage(content="x", grounding=out).model_dump_json())
    assert streamed == plain["grounding"] and streamed["boxes"][0]["bbox_px"] is None


def test_many_forms_stay_fast():
    text = "[" * 100_000 + '{"bbox_2d": [1, 2, 3, 4], "label": "x"}' * 5000
    assert len(g.find(text)) == g.MAX_ITEMS


# --------------------------------------------------------------------------- original size

def jpeg(w: int, h: int, orientation: int | None = None, color=(30, 160, 90)) -> bytes:
    img = Image.new("RGB", (w, h), color)
    img.paste((220, 20, 20), (0, 0, w // 3, h // 4))  # a corner that shows the rotation
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation,expect", [(None, (300, 120)), (1, (300, 120)),
                                                (3, (300, 120)), (6, (120, 300)),
                                                (8, (120, 300))])
def test_original_size_after_exif_orientation(orientation, expect):
    img = decode_image_bytes(jpeg(300, 120, orientation), MediaPolicy(), param="p")
    assert img.size == expect and original_size(img) == expect


def test_original_size_of_a_photo_decoded_at_a_reduced_scale():
    img = decode_image_bytes(jpeg(3000, 1000, 6), MediaPolicy(), param="p", max_pixels=4096)
    assert img.width * img.height < 3000 * 1000 // 16       # decoded small ...
    assert original_size(img) == (1000, 3000)               # ... the photo's size kept


# --------------------------------------------------------------------------- end to end

# sizes off the 32-pixel grid and over the test server's --max-pixels 65536: the model sees
# each smaller, and the large JPEG is even decoded at a reduced scale (server.api.media)
PHOTOS = {"non-square-png": ("image/png", None, (1001, 299)),
          "exif-rotated-jpeg": ("image/jpeg", 6, (600, 2000))}


def photo(kind: str) -> str:
    mime, orientation, _ = PHOTOS[kind]
    if mime == "image/png":
        img = Image.new("RGB", (1001, 299), (200, 40, 40))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return data_url(buf.getvalue(), mime)
    return data_url(jpeg(2000, 600, orientation), mime)


def ask(client, kind: str, **kw):
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Where is the red corner? Answer with a box and a point."},
        {"type": "image_url", "image_url": {"url": photo(kind)}}]}]
    return client.chat.completions.create(model="qwen3-vl", messages=msgs, max_tokens=96,
                                          response_format=FORMAT, temperature=0, **kw)


def check_mapped(grounding: dict, content: str, size: tuple[int, int]):
    w, h = size
    (img,) = grounding["images"]
    assert (img["index"], img["width"], img["height"]) == (0, w, h)
    assert img["model_width"] % 32 == 0 and img["model_height"] % 32 == 0
    assert img["model_width"] * img["model_height"] <= 65536 < w * h
    # the model's view keeps the photo's orientation (portrait stays portrait)
    assert (img["model_width"] > img["model_height"]) == (w > h)
    written = json.loads(content)
    (box,), (point,) = grounding["boxes"], grounding["points"]
    assert box["bbox_2d"] == written["bbox_2d"] and point["point_2d"] == written["point_2d"]
    assert box["bbox_px"] == [px(v, s) for v, s in zip(box["bbox_2d"], (w, h, w, h))]
    assert point["point_px"] == [px(point["point_2d"][0], w), px(point["point_2d"][1], h)]
    assert box["label"] == point["label"] == written["label"]
    assert box["image"] == point["image"] == 0


@pytest.mark.parametrize("kind", list(PHOTOS))
def test_boxes_come_back_in_the_photos_pixels(client, kind):
    size = PHOTOS[kind][2]
    plain = ask(client, kind)
    grounded = ask(client, kind, extra_body={"grounding": True})
    msg = grounded.choices[0].message
    assert grounded.choices[0].finish_reason == "stop", msg.content
    assert msg.content == plain.choices[0].message.content     # the answer untouched
    assert "grounding" not in plain.choices[0].message.model_dump(exclude_none=True)
    check_mapped(msg.model_extra["grounding"], msg.content, size)
    image_tokens = grounded.usage.prompt_tokens_details.image_tokens
    assert msg.model_extra["grounding"]["images"][0]["image_tokens"] == image_tokens > 0


def test_streamed_grounding_arrives_with_the_final_chunk(client):
    kind = "exif-rotated-jpeg"
    chunks = list(ask(client, kind, stream=True, extra_body={"grounding": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    carrying = [c for c in chunks if c.choices and
                (c.choices[0].delta.model_extra or {}).get("grounding") is not None]
    assert len(carrying) == 1 and carrying[0].choices[0].finish_reason == "stop"
    assert carrying[0] is [c for c in chunks if c.choices][-1]
    check_mapped(carrying[0].choices[0].delta.model_extra["grounding"], content,
                 PHOTOS[kind][2])
    assert content == ask(client, kind).choices[0].message.content
