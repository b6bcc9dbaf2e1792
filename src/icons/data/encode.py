"""LLaVA records -> token ids, labels and pixels; batching.

One encoder for every model: the conversation template (``models/template.py``: ``tiny`` or
LLaVA-1.5's ``vicuna_v1``) renders the record, ``<image>`` becomes the model's image tokens, and
labels are -100 everywhere except the assistant answers and their ``</s>`` (LLaVA's label masking),
so an example's loss is the mean over its own answer tokens. Training, feature extraction and
evaluation all encode through it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.tiny_llava import pixels_uint8

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixels: np.ndarray | None  # HWC uint8 (tiny model) or float32 CHW normalised (LLaVA-1.5); None: text-only
    truncated: bool = False


class ConversationEncoder:
    """LLaVA records -> :class:`Encoded` through a :class:`~icons.models.template.ChatTemplate`.

    The conversation is rendered as text (``template.render``), cut at each ``<image>`` (which
    becomes ``n_image_tokens`` image tokens), each text chunk tokenized as a whole (as LLaVA's
    ``tokenizer_image_token`` does) and every token inside an answer span kept in the labels: the
    answer, and its ``</s>``. Answer tokens are found by character offsets, not by LLaVA's
    tokenizer-specific length arithmetic. ``pixels(image)``: the model's image preprocessing."""

    def __init__(self, tokenizer, template, n_image_tokens: int, max_length: int, image_size: int, pixels,
                 image_root: str | Path | None = None):
        from ..models.template import IMAGE_TOKEN

        self.tok = tokenizer
        self.template = template
        self.n_image = n_image_tokens
        self.max_length = max_length
        self.image_size = image_size
        self.pixels = pixels
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_id is None or self.image_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token (use llava15.add_image_token)")
        if tokenizer.encode(template.sep2, add_special_tokens=False) != [tokenizer.eos_token_id]:
            raise ValueError(f"the tokenizer does not encode {template.sep2!r} as its eos token; "
                             f"the {template.name} template needs it")
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no bos token")

    def _chunks(self, record: dict, with_answer: bool) -> tuple[list[str], list[tuple[int, int]]]:
        from ..models.template import IMAGE_TOKEN

        text, spans = self.template.render(self.template.turns(record, with_answer))
        return text.split(IMAGE_TOKEN), spans

    def _ids_labels(self, record: dict, with_answer: bool) -> tuple[list[int], list[int]]:
        from ..models.template import IMAGE_TOKEN

        chunks, spans = self._chunks(record, with_answer)
        ids, labels = [self.tok.bos_token_id], [IGNORE]
        pos = 0
        for k, chunk in enumerate(chunks):
            if k:
                ids += [self.image_id] * self.n_image
                labels += [IGNORE] * self.n_image
                pos += len(IMAGE_TOKEN)
            if chunk:
                enc = self.tok(chunk, add_special_tokens=False, return_offsets_mapping=True)
                for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                    a, b = a + pos, b + pos
                    answer = any(a < e and b > s for s, e in spans)
                    ids.append(tid)
                    labels.append(tid if answer and with_answer else IGNORE)
            pos += len(chunk)
        return ids, labels

    def load_image(self, record: dict) -> np.ndarray | None:
        path = image_path(record, self.image_root)
        if path is None:
            return None
        with Image.open(path) as im:
            return self.pixels(im)

    def length(self, record: dict) -> int:
        """Token count of the whole conversation (image tokens included, before truncation),
        without decoding the image: what length-bucketed batch plans need. A conversation ending
        with the user's turn counts its generation prompt."""
        chunks, _ = self._chunks(record, True)
        n = 1 + (len(chunks) - 1) * self.n_image
        return n + sum(len(self.tok.encode(c, add_special_tokens=False)) for c in chunks if c)

    def encode(self, record: dict, with_answer: bool = True, pixels: np.ndarray | None = None,
               load_image: bool = True) -> Encoded:
        """Whole conversation (training) or, with ``with_answer=False``, the prompt up to the
        last assistant answer (generation). ``load_image=False``: tokens only (pixels None)."""
        from ..models.template import IMAGE_TOKEN

        n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"])
        if n_tokens > 1:
            raise ValueError(f"record {record.get('id')!r}: {n_tokens} {IMAGE_TOKEN} tokens; one image per record")
        if n_tokens and not has_image(record) and pixels is None:
            raise ValueError(f"record {record.get('id')!r}: {IMAGE_TOKEN} in the text but no image")
        ids, labels = self._ids_labels(record, with_answer)
        if pixels is None and load_image and self.image_id in ids:
            pixels = self.load_image(record)
        return within_length(record, ids, labels, pixels, self.image_id, self.max_length)


class Encoder(ConversationEncoder):
    """The tiny model's encoder: the ``tiny`` template, images resized to ``image_size`` and kept
    as HWC uint8 (``tiny_llava.pixels_uint8``; normalised when a batch is collated)."""

    def __init__(self, tokenizer, n_image_tokens: int, image_size: int, max_length: int,
                 image_root: str | Path | None = None):
        from functools import partial

        from ..models.template import TEMPLATES

        super().__init__(tokenizer, TEMPLATES["tiny"], n_image_tokens, max_length, image_size,
                         partial(pixels_uint8, image_size=image_size), image_root)


#: ``image`` values that mean "no image": Cambrian-7M writes these for its text-only records, and
#: its own loader reads them so (``str(sample["image"]) in ["", "None", "none", "nan"]``)
NO_IMAGE = ("", "None", "none", "nan")


def has_image(record: dict) -> bool:
    """Whether the record has an image: an ``image`` field that is not null and not one of
    :data:`NO_IMAGE` (a float NaN from a CSV-derived file reads as ``"nan"`` too)."""
    value = record.get("image")
    return value is not None and str(value) not in NO_IMAGE


def image_path(record: dict, image_root: Path | None) -> Path | None:
    """The record's image file (relative paths are under ``image_root``); None if text-only."""
    if not has_image(record):
        return None
    path = Path(record["image"])
    return image_root / path if image_root is not None and not path.is_absolute() else path


def within_length(record: dict, ids: list[int], labels: list[int], pixels, image_id: int, max_length: int) -> Encoded:
    """The encoded record within ``max_length``: answer text is cut from the end; image tokens are
    never cut (the image would be lost), so a prompt with its image longer than that is an error."""
    cut = len(ids) > max_length
    if cut:
        if ids[:max_length].count(image_id) != ids.count(image_id):
            raise ValueError(f"record {record.get('id')!r}: prompt with image longer than max_length={max_length}")
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, pixels if image_id in ids else None, cut)


def collate(batch: list[Encoded], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest example. ``pixel_values`` stacks only image-bearing examples (in batch
    order) and is omitted when none has an image: LLaVA's generate fails on pixel_values=None."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        sl = slice(width - n, width) if left_pad else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pix = [e.pixels for e in batch if e.pixels is not None]
    if pix and pix[0].dtype != np.uint8:
        # float (3, H, W): already the model's input (LLaVA-1.5's preprocessing, models/llava15.py)
        out["pixel_values"] = torch.from_numpy(np.stack(pix))
    elif pix:
        from ..models.tiny_llava import normalise

        out["pixel_values"] = normalise(torch.from_numpy(np.stack(pix)))
    return out


class LazyEncoded(Sequence):
    """Records encoded when a batch asks for them, images decoded then. Encoding a real subset up
    front would not fit: 133K LLaVA-1.5 examples are 180 GB of float pixels (3 x 336 x 336 x 4 B
    each). Construction makes one pass over the token ids only, so a record that cannot be encoded
    stops the run before training starts, and counts the records cut at ``max_length``."""

    def __init__(self, records: list[dict], encoder: Encoder, with_answer: bool = True):
        self.records, self.encoder, self.with_answer = records, encoder, with_answer
        self.truncated = sum(encoder.encode(r, with_answer, load_image=False).truncated for r in records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Encoded:
        return self.encoder.encode(self.records[i], self.with_answer)
