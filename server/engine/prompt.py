"""Turn an ``EngineRequest`` into model inputs: chat template, image patches, token ids.

Runs on the engine's preparation threads (off the event loop and off the GPU thread),
or, for a text prompt an API server has tokenised already, on the engine's event loop
(``AsyncEngine._prepare_async``: microseconds, no pixels).  A request's images are
preprocessed together, each with its own pixel budget, by the torch pipeline
(``models.vision_prep``: uint8 patches on the host, ``--image-preprocess torch``;
``model_pixels`` normalises them on the model's device when the encoder takes them) or
one by one by the HF PIL processor (``--image-preprocess pil``, the reference); each
``<|image_pad|>`` placeholder is then expanded to the number of merged patches, as Qwen's
processor does.  The context check (prompt + max_tokens <= max_model_len) happens
here, before any model work.

Two steps, so that the cheap checks come before the expensive work: ``plan`` renders the
template and counts each image's tokens from its size and budget alone (``geometry``: the
processor's own ``smart_resize``), then checks the context length; ``finish`` preprocesses
the pixels (and re-counts, should the processor disagree).  ``build`` does both.  The
engine compiles a request's grammar between the two.  ``count`` is ``plan`` without the
context check, for ``/tokenize``: the same ids ``finish`` would run, no cache touched.

The prompt is tokenised in pieces, cut at the vision slots (``server.textprep.split_slots``:
the ids are those of the whole string, the slots being added tokens), and the pieces are
expanded with each image's placeholder run and each video's frame text (``_expand``); a
processor that counts otherwise than ``plan`` re-expands, it does not re-tokenise.  Behind
API servers the pieces arrive made (``EngineRequest.pieces``, ``server.textprep``): the
template is rendered and the text tokenised there, and this process only expands them.

Image identity: ``Prepared.image_keys`` holds one key per image, in order:
``"<digest>:<min_pixels>:<max_pixels>"``, where the digest is the hash of the image's bytes
as received (``ImageInput.digest``, from ``server.api.media``) or, for an image handed over
already decoded, a BLAKE2b hash of its mode, size and pixels ("px" prefix, so the two kinds
never meet).  Equal keys mean equal pixel values and grids; the prefix cache and encoder
cache key by them.  A request's ``cache_salt`` (its tenant, see ``EngineRequest``) prefixes
each key as ``"<salt hash>/"``: one tenant's cached pixels, encoder outputs and prefix
blocks are never another tenant's hits.  Preprocessed pixels are kept by key in a ``ByteLRU`` (``image_cache``,
``--image-cache-mb``): a resent image is not preprocessed again.

Videos (``EngineRequest.videos``: frames sampled and decoded on the API side, see
``models.video``) are preprocessed by ``models.video_prep.TorchVideoProcessor`` (no
torchvision): their grids, timestamps and prompt text come from the frames' size and the
budget alone, so ``plan`` counts them as it counts images; ``finish`` makes the pixels
(uint8 patches, cached by the video's key like an image's, normalised where the encoder
takes them; see ``_add_videos``) and turns each frame pair into a vision item of ``t = 1``
(``Prepared``), which the engine
encodes, caches and positions like an image, as transformers' ``get_rope_index`` splits
a video's grid at its timestamps.

Thread safety: the engine runs ``plan``/``finish`` on ``--prep-workers`` threads at once
(and on its event loop, see above).  The HF fast tokenizer may mutate its Rust backend
(padding/truncation state) inside a call, and a second thread inside it then raises
"Already borrowed": tokenizer calls hold ``_tokenizer_lock`` (a short hold; the images,
the long part, run unlocked).  Template rendering, the image pipeline and the cache are
safe to share.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from models.processor import image_budget_kwargs
from models.vision_prep import TorchImageProcessor, hf_smart_resize
from server.engine.interface import (EngineRequest, ImageGeometry, ImageInput, PromptCount,
                                     SamplingParams, VideoInput)
from server.engine.lru import ByteLRU
from server.engine.transfer import to_device
from server.errors import ContextLengthExceeded, InternalError, InvalidRequest
# the template's placeholders and the cut at them, shared with the API servers' TextPrep;
# Qwen's processor replaces a <|video_pad|> (only: the template's own markers stay around
# it) with one "<t seconds><|vision_start|><|video_pad|>...<|vision_end|>" per frame pair
from server.textprep import IMAGE_PAD, VIDEO_PAD, split_slots

log = logging.getLogger("qwen_vl.engine")


@dataclass
class Prepared:
    """A prompt ready for the engine.  Its vision *items* are its images and its videos'
    frame pairs (each pair has its own run of placeholders in the prompt, between its
    timestamp and the next: the model places and positions it as an image of ``t = 1``),
    in prompt order: ``image_grid_thw``, ``pixel_values`` and ``image_keys`` are per item."""
    input_ids: torch.Tensor            # (1, L) long
    mm_token_type_ids: torch.Tensor    # (1, L) int: 1 on image tokens, 2 on video tokens
    pixel_values: torch.Tensor | None  # (patches, 3, patch^2) uint8, or (patches, dim) float
    image_grid_thw: torch.Tensor | None  # (items, 3)
    params: SamplingParams             # max_tokens filled in
    # one per item, in order: "<digest>:<min_pixels>:<max_pixels>" (see the module doc); a
    # video's frame pair adds "#<pair>"
    image_keys: list[str] = field(default_factory=list)
    cache_salt: str = ""               # the request's tenant: the prefix cache's chain seed
    # per video (t, h, w) and, per item, the video it belongs to (-1: an image): what HF's
    # own forward takes (``hf_vision_inputs``)
    video_grid_thw: torch.Tensor | None = None
    item_video: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def image_tokens(self) -> int:
        """Prompt tokens that stand for images (usage.prompt_tokens_details.image_tokens)."""
        return int((self.mm_token_type_ids == 1).sum())

    @property
    def video_tokens(self) -> int:
        """... and for the videos' frames (usage.prompt_tokens_details.video_tokens)."""
        return int((self.mm_token_type_ids == 2).sum())

    def hf_vision_inputs(self, pixels) -> dict:
        """``pixel_values``/``image_grid_thw`` and ``pixel_values_videos``/``video_grid_thw``
        for the model's own forward (``generate``), from the items; ``pixels`` maps the
        prepared pixels to the model's (``PromptBuilder.model_pixels``)."""
        if self.pixel_values is None:
            return {}
        rows = self.image_grid_thw.prod(-1).tolist()
        parts = pixels(self.pixel_values).split(rows)
        kinds = self.item_video or [-1] * len(rows)
        out = {}
        images = [i for i, v in enumerate(kinds) if v < 0]
        if images:
            out.update(pixel_values=torch.cat([parts[i] for i in images]),
                       image_grid_thw=self.image_grid_thw[images])
        if self.video_grid_thw is not None:
            out.update(pixel_values_videos=torch.cat([parts[i] for i, v in enumerate(kinds)
                                                      if v >= 0]),
                       video_grid_thw=self.video_grid_thw)
        return out


@dataclass
class Plan:
    """What ``plan`` found: the prompt's token ids between its vision slots (``pieces``;
    ``kinds``: "image" or "video" per slot, in order), the images' token counts (None when
    the processor cannot count ahead), the videos' prompt tokens and grids, and the whole
    prompt's ids (``pieces`` expanded)."""
    pieces: list[list[int]]
    image_tokens: list[int] | None
    input_ids: torch.Tensor | None
    params: SamplingParams
    kinds: list[str] = field(default_factory=list)
    video_fills: list[tuple[list[int], tuple[int, int, int]]] = field(default_factory=list)


class PromptBuilder:
    def __init__(self, processor, *, max_model_len: int, default_max_tokens: int,
                 image_preprocess: str = "torch", device: torch.device | str = "cpu",
                 image_cache_bytes: int = 0, video_processor=None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        # models.video_prep.TorchVideoProcessor: sampled frames -> pixels, grid, prompt text
        self.videos = video_processor
        self.merge = processor.image_processor.merge_size
        self.patch = processor.image_processor.patch_size
        try:
            self._smart_resize = hf_smart_resize(processor.image_processor)
        except ValueError:  # a processor we cannot count ahead for: finish() counts
            self._smart_resize = None
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.opens_think = self._template_opens_think()
        self.fast_images = self._fast_images(image_preprocess, device)
        # on a GPU the prepared request keeps uint8 patches and model_pixels normalises
        # them there; with the model on the CPU there is no crossing to save, and the
        # preparation threads normalise (off the engine thread)
        self.normalise_on_device = torch.device(device).type != "cpu"
        # key -> (pixel_values, grid) of one image, on the host
        self.image_cache: ByteLRU[tuple[torch.Tensor, torch.Tensor]] = ByteLRU(image_cache_bytes)
        log.info("preprocessed-pixel cache: %s", f"{image_cache_bytes / 2**20:g} MiB"
                 if image_cache_bytes else "off")
        self._tokenizer_lock = threading.Lock()
        # chat templates rendered by plan(): /metrics shows it, and tests prove with it
        # that a request refused by the text limits was never rendered nor tokenised
        self.renders = 0
        self._renders_lock = threading.Lock()

    def _fast_images(self, mode: str, device) -> TorchImageProcessor | None:
        if mode == "torch":
            try:  # the host half: decode, resize and patchify to uint8 on the CPU
                fast = TorchImageProcessor.from_hf(self.processor.image_processor, device="cpu")
            except ValueError as exc:  # a processor configuration the pipeline does not mirror
                log.warning("torch image preprocessing unavailable (%s): using the PIL processor", exc)
            else:
                log.info("image preprocessing: torch pipeline, uint8 patches on the host "
                         "(%s resize), normalised on %s", fast.resize_kernel, device)
                return fast
        log.info("image preprocessing: PIL processor (%s) on the CPU",
                 type(self.processor.image_processor).__name__)
        return None

    def _template_opens_think(self) -> bool:
        """Whether the generation prompt ends inside an opened ``<think>`` block (thinking
        models' templates do; then the output starts with reasoning)."""
        try:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        except Exception:
            return False
        return text.rstrip().endswith("<think>")

    def build(self, req: EngineRequest) -> Prepared:
        return self.finish(req, self.plan(req))

    def plan(self, req: EngineRequest) -> Plan:
        """Template, token count and context check: no pixel is touched."""
        if req.prompt_token_ids is not None:
            ids = self._given_ids(req.prompt_token_ids)
            return Plan([], [], ids, self._fill_max_tokens(req.params, ids.shape[1]))
        pieces, kinds, videos, counts = self._pieces(req)
        if None in counts:  # the processor cannot count ahead: finish() checks
            return Plan(pieces, None, None, req.params, kinds, videos)
        ids = self._expand(pieces, kinds, counts, videos)
        return Plan(pieces, counts, ids, self._fill_max_tokens(req.params, ids.shape[1]),
                    kinds, videos)

    def count(self, req: EngineRequest) -> PromptCount:
        """The token ids ``finish`` would run for ``req`` (images counted as ``plan`` does,
        or from their preprocessed grids where it cannot), with no context check and no
        cache read or written: a count of one tenant's images is no hit for another."""
        if req.prompt_token_ids is not None:
            return PromptCount(self._given_ids(req.prompt_token_ids)[0].tolist(), 0)
        pieces, kinds, videos, counts = self._pieces(req)
        if None in counts:
            counts = [int(g.prod()) // self.merge ** 2 for g in self._images(req.images)[1]]
        ids = self._expand(pieces, kinds, counts, videos)
        return PromptCount(ids[0].tolist(), sum(counts),
                           sum(self.videos.tokens(g) for _, g in videos))

    def _pieces(self, req: EngineRequest):
        """The prompt's token pieces and slot kinds (rendered and tokenised here, or on
        the API server: ``req.pieces``), its videos' fills, its images' token counts."""
        if req.videos and self.videos is None:
            raise InvalidRequest("Video input is not enabled on this server.",
                                 param="messages")
        with self._renders_lock:  # a prompt rendered here or on an API server
            self.renders += 1
        if req.pieces is not None:
            pieces, kinds = req.pieces.ids, req.pieces.kinds
            if (kinds.count("image"), kinds.count("video")) != (len(req.images),
                                                                 len(req.videos)):
                raise InternalError("the API server's prompt slots do not match its media")
        else:
            pieces, kinds = self._render(req)
        videos = [self._video_fill(v) for v in req.videos]
        counts = [self._image_tokens(im) for im in req.images]
        return pieces, kinds, videos, counts

    def _given_ids(self, ids: list[int]) -> torch.Tensor:
        """A prompt given as token ids: (1, L).  Image and video placeholders are refused:
        they would stand for pixels the request does not have."""
        t = torch.tensor([ids], dtype=torch.long)
        if bool((t == self.image_token_id).any() | (t == self.video_token_id).any()):
            raise InvalidRequest("The prompt may not contain the image or video placeholder "
                                 "tokens.",
                                 param="prompt")
        return t

    def _render(self, req: EngineRequest) -> tuple[list[list[int]], list[str]]:
        """The chat template's text (or the plain prompt), cut at the image placeholders
        and the videos' slots (``server.textprep.split_slots``) and tokenised piece by
        piece; and the kind of each slot, in order."""
        if req.prompt is not None:
            text, param = req.prompt, "prompt"
        else:
            text, param = self.processor.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=True,
                tools=req.tools), "messages"
        parts, kinds = split_slots(text, len(req.images), len(req.videos), param)
        with self._tokenizer_lock:
            ids = self.tokenizer(parts, add_special_tokens=False)["input_ids"]
        return ids, kinds

    def template_spec(self) -> dict:
        """What an API server needs to render prompts as ``_render`` does
        (``server.textprep.TextPrep``): the processor's chat template (None where it has
        no single one) and the special-token variables it renders with."""
        template = getattr(self.processor, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        tokens = {k: [str(t) for t in v] if isinstance(v, (list, tuple)) else str(v)
                  for k, v in self.tokenizer.special_tokens_map.items()}
        return {"chat_template": template if isinstance(template, str) else None,
                "template_vars": tokens}

    def _video_fill(self, v: VideoInput) -> tuple[list[int], tuple[int, int, int]]:
        """A video's prompt tokens (a timestamp and a run of placeholders per frame pair,
        as Qwen's processor writes it) and its grid, from its size and budget alone."""
        d = v.video
        t, h, w = d.frames.shape[:3]
        grid = self.videos.grid(t, h, w, v.min_pixels, v.max_pixels)
        text = self.videos.placeholder(grid, self.videos.timestamps(d.frame_indices, d.fps))
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, grid

    def finish(self, req: EngineRequest, plan: Plan) -> Prepared:
        """Preprocess the images and videos; ``req.params`` may carry the compiled grammar
        by now."""
        keys = [image_key(im, req.cache_salt) for im in req.images]
        pixel_values, grids = self._cached_images(req.images, keys) if req.images else (None, None)
        counts = [int(g.prod()) // self.merge ** 2 for g in grids] if req.images else []
        ids = plan.input_ids if counts == plan.image_tokens else self._expand(
            plan.pieces, plan.kinds, counts, plan.video_fills)
        mm = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
        prepared = Prepared(
            input_ids=ids, mm_token_type_ids=mm, pixel_values=pixel_values,
            image_grid_thw=grids, params=self._fill_max_tokens(req.params, ids.shape[1]),
            image_keys=keys, cache_salt=req.cache_salt)
        if req.videos:
            self._add_videos(prepared, req, plan.kinds)
        return prepared

    def _add_videos(self, prep: Prepared, req: EngineRequest, kinds: list[str]) -> None:
        """Interleave the videos' frame pairs with the images as items, in prompt order
        (see ``Prepared``).  A request of videos alone keeps their uint8 patches (a quarter
        of float32's bytes, normalised where the encoder takes them: ``model_pixels``), as
        photos do; with photos beside them, whose uint8 patches have another layout, all
        are normalised here, on the preparation thread, and so are they all on a CPU model
        (no crossing to save)."""
        image_pix = prep.pixel_values
        uint8 = image_pix is None and self.normalise_on_device
        if image_pix is not None and image_pix.dtype == torch.uint8:
            image_pix = self.fast_images.normalise(image_pix)
        image_rows = prep.image_grid_thw.prod(-1).tolist() if image_pix is not None else []
        image_parts = list(image_pix.split(image_rows)) if image_pix is not None else []
        pix, grids, keys, owner, video_grids = [], [], [], [], []
        images = iter(range(len(req.images)))
        videos = iter(enumerate(req.videos))
        for kind in kinds:
            if kind == "image":
                i = next(images)
                pix.append(image_parts[i])
                grids.append(prep.image_grid_thw[i].view(3))
                keys.append(prep.image_keys[i])
                owner.append(-1)
                continue
            j, v = next(videos)
            key = video_key(v, req.cache_salt)
            pixels, (t, h, w) = self._cached_video(v, key)
            if not uint8:
                pixels = self.videos.normalise(pixels)
            video_grids.append((t, h, w))
            for pair, part in enumerate(pixels.split(h * w)):
                pix.append(part)
                grids.append(torch.tensor([1, h, w]))
                keys.append(f"{key}#{pair}")
                owner.append(j)
        merged = sum(int(g.prod()) for g, o in zip(grids, owner) if o >= 0) // self.merge ** 2
        if merged != prep.video_tokens:  # the prompt's runs must be the pixels' (keys: exact)
            raise InternalError(f"video placeholders ({prep.video_tokens}) and pixels "
                                f"({merged} tokens) disagree")
        prep.pixel_values = torch.cat(pix)
        prep.image_grid_thw = torch.stack(grids).to(torch.int64)
        prep.image_keys, prep.item_video = keys, owner
        prep.video_grid_thw = torch.tensor(video_grids, dtype=torch.int64)

    def _cached_video(self, v: VideoInput, key: str) -> tuple[torch.Tensor, tuple]:
        """A video's uint8 patches and grid, through the pixel cache (by its key)."""
        got = self.image_cache.get(key) if self.image_cache.enabled else None
        if got is None:
            got = self.videos.patches(v.video.frames, v.min_pixels, v.max_pixels)
            if self.image_cache.enabled:
                self.image_cache.put(key, got, got[0].numel() * got[0].element_size())
        return got

    def _cached_images(self, images: list[ImageInput],
                       keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``_images`` through the pixel cache: the misses are preprocessed together (one
        batched pipeline call), split per image and stored; the hits are reused as is."""
        cache = self.image_cache
        if not cache.enabled:
            return self._images(images)
        got = {k: cache.get(k) for k in dict.fromkeys(keys)}  # one query per distinct image
        missing = [k for k, v in got.items() if v is None]
        if missing:
            first = {k: keys.index(k) for k in missing}
            pixels, grids = self._images([images[first[k]] for k in missing])
            sizes = [int(g.prod()) for g in grids]  # patches (rows of pixel_values) per image
            parts = pixels.split(sizes) if len(missing) > 1 else (pixels,)
            for k, pv, grid in zip(missing, parts, grids):
                # a slice would keep the whole batch's storage alive behind the cache's back
                pv = pv.clone() if len(missing) > 1 else pv
                grid = grid.clone()
                got[k] = (pv, grid)
                cache.put(k, got[k], pv.numel() * pv.element_size()
                          + grid.numel() * grid.element_size())
        found = [got[k] for k in keys]
        if len(found) == 1:
            return found[0][0], found[0][1].view(1, 3)
        return (torch.cat([f[0] for f in found]),
                torch.stack([f[1].view(3) for f in found]))

    def _images(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel values, grids) of a request's images, each in its own pixel budget."""
        if self.fast_images is not None:
            # uint8 patches on the host (~3 MB per 1024-token image where float32 pixels
            # are 25 MB): a prepared request waits in the queue in host memory, and the
            # pixels cross to the device once, when the encoder takes them (model_pixels)
            patches, grids = self.fast_images.patches(
                [im.image for im in images], [(im.min_pixels, im.max_pixels) for im in images])
            return (patches if self.normalise_on_device
                    else self.fast_images.normalise(patches)), grids
        outs = [self.processor.image_processor(  # the PIL twin: PIL images in
            images=[im.image.to_pil() if hasattr(im.image, "to_pil") else im.image],
            return_tensors="pt",
            **image_budget_kwargs(im.min_pixels, im.max_pixels)) for im in images]
        return (torch.cat([o["pixel_values"] for o in outs]),
                torch.cat([o["image_grid_thw"] for o in outs]))

    def model_pixels(self, pixels: torch.Tensor, device) -> torch.Tensor:
        """Prepared pixels as the vision encoder takes them, on ``device``: uint8 patches
        (the torch pipeline's host half) are copied up once, from pinned memory without
        a stall, and normalised there; the PIL processor's float pixels are copied as
        they are."""
        if pixels.dtype != torch.uint8:
            return pixels.to(device)
        if pixels.dim() == 2:  # a video's patches, both frames of each pair in them
            return self.videos.normalise(to_device(pixels, device))
        return self.fast_images.normalise(to_device(pixels, device))

    def geometry(self, im: ImageInput) -> ImageGeometry | None:
        """The size ``im`` is resized to within its pixel budget and its token count: the
        processor's own ``smart_resize`` arithmetic (None where it has none)."""
        if self._smart_resize is None:
            return None
        try:
            h, w = self._smart_resize(im.image.height, im.image.width,
                                      factor=self.patch * self.merge,
                                      min_pixels=im.min_pixels, max_pixels=im.max_pixels)
        except Exception:
            return None
        return ImageGeometry(width=int(w), height=int(h),
                             tokens=int(h * w) // (self.patch * self.merge) ** 2)

    def _image_tokens(self, im) -> int | None:
        g = self.geometry(im)
        return None if g is None else g.tokens

    def _expand(self, pieces: list[list[int]], kinds: list[str], counts: list[int],
                videos: list[tuple[list[int], tuple]]) -> torch.Tensor:
        """The prompt's ids, (1, L): the pieces with each image's placeholder run (its
        token count) and each video's fill between them."""
        ids = list(pieces[0])
        images, fills = iter(counts), iter(videos)
        for kind, rest in zip(kinds, pieces[1:]):
            ids += [self.image_token_id] * next(images) if kind == "image" else next(fills)[0]
            ids += rest
        return torch.tensor([ids], dtype=torch.long)

    def _fill_max_tokens(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if params.max_tokens is None and room >= 1:
            return params.replace(max_tokens=min(self.default_max_tokens, room))
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the messages use {prompt_len}.", param="messages")
        if prompt_len + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"messages use {prompt_len} and max_tokens asks for {params.max_tokens}.",
                param="max_tokens")
        return params


def image_key(im: ImageInput, salt: str = "") -> str:
    """The image's content key with its pixel budget, under its tenant's salt (see the
    module doc)."""
    digest = im.digest or pixel_digest(im.image)
    return _salted(f"{digest}:{im.min_pixels}:{im.max_pixels}", salt)


def _salted(key: str, salt: str) -> str:
    return hashlib.blake2b(salt.encode(), digest_size=8).hexdigest() + "/" + key if salt \
        else key


def video_key(v: VideoInput, salt: str = "") -> str:
    """A video's key, like an image's: its digest (bytes and sampling) and pixel budget."""
    return _salted(f"{v.digest or pixel_digest(v.video.frames)}:{v.min_pixels}:"
                   f"{v.max_pixels}", salt)


def pixel_digest(image) -> str:
    """BLAKE2b-128 of a decoded image's mode, size and pixel bytes ("px" + hex); an array
    or tensor (what the torch pipeline also takes) by its dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    if hasattr(image, "mode") and hasattr(image, "tobytes"):  # PIL.Image
        h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
        h.update(image.tobytes())
    else:
        arr = np.ascontiguousarray(image.cpu() if isinstance(image, torch.Tensor) else image)
        h.update(f"{arr.dtype}:{arr.shape}:".encode())
        h.update(memoryview(arr).cast("B"))
    return "px" + h.hexdigest()
