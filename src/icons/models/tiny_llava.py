"""A tiny but real LLaVA: ``LlavaForConditionalGeneration`` = small CLIP vision tower + small Llama.

Everything is built locally (no hub): a word-level tokenizer trained on the benchmark's text, the
model from configs, and a processor (``CLIPImageProcessorPil``: the default CLIP processor needs
torchvision). Saved and loaded with ``save_pretrained``/``from_pretrained`` like any checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Digits are split so numbers stay compositional; no lowercasing ('A' the option letter and
    # 'a' the article must stay distinct).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"})


def n_image_tokens(image_size: int, patch_size: int) -> int:
    return (image_size // patch_size) ** 2  # the 'default' feature strategy drops CLS


def build_model(tokenizer, image_size=32, patch_size=8, vision_hidden=96, vision_layers=2,
                text_hidden=160, text_layers=4, text_heads=4, max_positions=256, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                          intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                          num_attention_heads=4, projection_dim=vision_hidden)
    tc = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=3 * text_hidden,
                     num_hidden_layers=text_layers, num_attention_heads=text_heads,
                     num_key_value_heads=text_heads, max_position_embeddings=max_positions,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    # vision_feature_layer -1: with a 2-layer tower the penultimate layer (LLaVA-1.5's -2) is
    # the output of its first block, too shallow to bind colour and shape.
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tokenizer.image_token_id,
                      image_seq_length=n_image_tokens(image_size, patch_size), vision_feature_layer=-1,
                      vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id,
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg)


def image_processor(image_size: int = 32):
    """The tiny model's image preprocessing as an HF image processor (for the processor saved with
    every checkpoint and the export): a plain bicubic resize to ``image_size``, mean/std 0.5, as
    :func:`pixels_uint8` + :func:`normalise` compute it in training (tested to 1e-6)."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                 resample=PILImageResampling.BICUBIC, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_processor(tokenizer, image_size: int = 32, patch_size: int = 8):
    """A ``LlavaProcessor`` for the tiny model, with the ``tiny`` chat template."""
    from transformers import LlavaProcessor

    from .template import TEMPLATES, adds_bos

    # num_additional_image_tokens=1: the CLIP tower's CLS token (without it the processor inserts
    # one image token too few and the forward pass fails).
    return LlavaProcessor(image_processor=image_processor(image_size), tokenizer=tokenizer,
                          patch_size=patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1,
                          chat_template=TEMPLATES["tiny"].jinja(bos=not adds_bos(tokenizer)))


def pixels_uint8(image: Image.Image, image_size: int) -> np.ndarray:
    """HWC uint8 of the image at the model's size (the one preprocessing path for all stages)."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(image, np.uint8)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), identical to the processor's mean/std 0.5."""
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def save(model, tokenizer, path: str | Path, image_size: int = 32, patch_size: int = 8) -> None:
    path = Path(path)
    model.save_pretrained(path)
    build_processor(tokenizer, image_size, patch_size).save_pretrained(path)


def load(path: str | Path):
    """(model, tokenizer) from a checkpoint directory written by ``save`` (or any HF LLaVA dir)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
