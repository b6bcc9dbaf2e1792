"""CLIP-Score of every pool record: the cosine of a CLIP model's image and text embeddings (HF
``CLIPModel``: both towers), into a :class:`~icons.selectors.store.RowStore` column ``clip_score``.

The text is the record's conversation (every turn, ``<image>`` removed, turns joined by newlines),
cut at the text tower's length (CLIP's 77 tokens): what the image is asked and told about it.
A record without an image scores NaN (the selector ranks it last). Sharded over ranks and resumed
like the forward store (``forward.py``).
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ..data.encode import has_image, image_path
from ..predict import Rows
from .forward import predict_into
from .store import RowStore


def conversation_text(record: dict) -> str:
    return "\n".join(t["value"].replace("<image>", "").strip() for t in record["conversations"]).strip()


def load_clip(path: str | Path):
    """(CLIPModel, tokenizer, image processor) of a local CLIP checkpoint directory."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"selector.clip_score.model={path}: no CLIP checkpoint there (config.json)")
    model = CLIPModel.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), CLIPImageProcessorPil.from_pretrained(path)


class ClipSteps(L.LightningModule):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.max_len = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                           model.config.text_config.max_position_embeddings)

    def predict_step(self, batch: Rows, batch_idx: int = 0):
        texts, pixels = batch.data
        score = np.full(len(batch.idx), np.nan, dtype=np.float32)
        has = [i for i, p in enumerate(pixels) if p is not None]
        if has:
            t = self.tok([texts[i] for i in has], padding=True, truncation=True, max_length=self.max_len,
                         return_tensors="pt").to(self.device)
            img = self.model.get_image_features(pixel_values=torch.stack([pixels[i] for i in has]).to(self.device))
            txt = self.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
            img, txt = (_tensor(img), _tensor(txt))
            score[has] = torch.nn.functional.cosine_similarity(img, txt, dim=1).float().cpu().numpy()
        return [(batch.idx, {"clip_score": score})]


def _tensor(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor, or (in some versions) an output with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def fill_clip_store(model_dir: str | Path, records, image_root: Path | None, out_dir: Path, made: dict,
                    batch_size: int, device, rank: int = 0, world_size: int = 1, trainer_cfg=None) -> dict:
    from PIL import Image

    t0 = time.time()
    model, tok, proc = load_clip(model_dir)
    model.to(device).eval()
    store = RowStore.open(out_dir, len(records), {"clip_score": (1, "float32")}, {**made, "clip": str(model_dir)})
    plan = [list(range(s, min(s + batch_size, len(records)))) for s in range(0, len(records), batch_size)]

    def make(rows):
        texts, pixels = [], []
        for i in rows:
            r = records[i]
            texts.append(conversation_text(r))
            if has_image(r):
                with Image.open(image_path(r, image_root)) as im:
                    pixels.append(torch.as_tensor(proc(im.convert("RGB"), return_tensors="np")["pixel_values"][0]))
            else:
                pixels.append(None)
        return Rows(rows, (texts, pixels))

    done = predict_into(store, plan, make, ClipSteps(model, tok), "forward: clip", rank, world_size, trainer_cfg)
    return {"rows_done": done, "complete": store.complete, "wall_s": round(time.time() - t0, 2)}
