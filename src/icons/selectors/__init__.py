"""The baseline selectors beside ICONS, at the same budget on the same pool (``selectors=[..., el2n]``).

Each selector is a plain function (``baselines.py``) over per-example values that the ``forward``
stage computes once per model into a resumable, sharded store (``forward.py``, ``store.py``;
``clip.py`` for CLIP-Score's own model): ``base`` (the model every run starts from: perplexity,
embeddings, COINCIDE's activations), ``warmup`` (the last warmup checkpoint: EL2N) and ``clip``.
``choose.py`` names them, says what each reads and joins the two for the ``select`` stage.
"""
from __future__ import annotations

from .choose import SELECTORS

#: the stores each baseline reads (``length`` reads only the tokenizer)
NEEDS: dict[str, tuple[str, ...]] = {name: b.needs for name, b in SELECTORS.items()}


def stores_needed(selectors) -> list[str]:
    """The forward stores the configured selectors read, in the order base, warmup, clip."""
    wanted = {m for s in selectors for m in NEEDS.get(s, ())}
    return [m for m in ("base", "warmup", "clip") if m in wanted]
