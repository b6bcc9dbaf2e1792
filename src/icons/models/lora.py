"""LoRA on the language model only (a plain module list would also wrap the CLIP tower)."""
from __future__ import annotations


def add_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=int(lora_cfg.r), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                     target_modules=str(lora_cfg.target_modules), bias="none")
    return get_peft_model(model, cfg)
