"""The tiny LoRA-wrapped LLaVA and the Adam moments the feature tests share. Seeded: every test
(and every spawned process) that builds it gets the same weights and moments."""
import torch
from omegaconf import OmegaConf

from icons.data.mini_llava import tokenizer_corpus
from icons.models import tiny_llava
from icons.models.lora import add_lora

LORA = OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": r".*language_model.*\.(q_proj|v_proj)"})


def tiny_lora_model(lora=LORA):
    """(tokenizer, model in eval mode) with non-zero LoRA B weights, so gradients reach A too."""
    tok = tiny_llava.build_tokenizer(tokenizer_corpus(per_family=50, per_task=20))
    torch.manual_seed(0)
    model = add_lora(tiny_llava.build_model(tok, text_hidden=64, text_layers=2, vision_hidden=32), lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    return tok, model


def random_moments(model, seed: int = 1):
    """(m, v, info): Adam moments of a plausible size for every trainable weight."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    m = {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}
    v = {n: torch.rand(s, generator=g) * 1e-5 for n, s in shapes.items()}
    return m, v, {"betas": [0.9, 0.999], "eps": 1e-8, "avg_lr": 1e-3}
