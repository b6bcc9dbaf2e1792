"""LLaVA records -> token ids, labels and pixels; batching.

Conversation layout (Vicuna-style, as the tiny model's chat template):
  <s> USER: <image>*N question ASSISTANT: answer </s> USER: ... ASSISTANT: ... </s>
Labels are -100 everywhere except the assistant answers and their </s> (LLaVA label masking), so
an example's loss is the mean over its own answer tokens.
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


class Encoder:
    def __init__(self, tokenizer, n_image_tokens: int, image_size: int, max_length: int,
                 image_root: str | Path | None = None):
        self.tok = tokenizer
        self.n_image = n_image_tokens
        self.image_size = image_size
        self.max_length = max_length
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_id = tokenizer.image_token_id
        self.user = tokenizer.convert_tokens_to_ids("USER:")
        self.assistant = tokenizer.convert_tokens_to_ids("ASSISTANT:")
        self._cache: dict[str, list[int]] = {}

    def text_ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def _human(self, text: str) -> list[int]:
        ids = [self.user]
        parts = text.split("<image>")
        for k, part in enumerate(parts):
            if k:
                ids += [self.image_id] * self.n_image
            ids += self.text_ids(part)
        return ids + [self.assistant]

    def load_image(self, record: dict) -> np.ndarray | None:
        path = image_path(record, self.image_root)
        if path is None:
            return None
        with Image.open(path) as im:
            return pixels_uint8(im, self.image_size)

    def length(self, record: dict) -> int:
        """Token count of the whole conversation (before truncation), without decoding the image:
        what length-bucketed batch plans need."""
        n = 1
        for t in record["conversations"]:
            if t["from"] == "human":
                n += len(self._human(t["value"]))
            else:
                n += len(self.text_ids(t["value"])) + 1
        return n

    def encode(self, record: dict, with_answer: bool = True, pixels: np.ndarray | None = None,
               load_image: bool = True) -> Encoded:
        """Whole conversation (training) or, with ``with_answer=False``, the prompt up to the
        last assistant answer (generation). ``load_image=False``: tokens only (pixels None)."""
        conv = record["conversations"]
        ids, labels = [self.tok.bos_token_id], [IGNORE]
        turns = conv if with_answer else conv[:-1]
        for t in turns:
            if t["from"] == "human":
                h = self._human(t["value"])
                ids += h
                labels += [IGNORE] * len(h)
            else:
                a = self.text_ids(t["value"]) + [self.tok.eos_token_id]
                ids += a
                labels += a
        if not with_answer:
            labels = [IGNORE] * len(ids)
        if pixels is None and load_image:
            pixels = self.load_image(record)
        return within_length(record, ids, labels, pixels, self.image_id, self.max_length)


def image_path(record: dict, image_root: Path | None) -> Path | None:
    """The record's image file (relative paths are under ``image_root``); None if text-only."""
    if record.get("image") is None:
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
