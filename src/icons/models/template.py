"""The conversation templates, each defined once: the text a record becomes, and the same text as a
Jinja chat template for the exported processor.

Both templates are LLaVA's ``SeparatorStyle.TWO`` (``conv_vicuna_v1`` of ``llava/conversation.py``)::

    [SYSTEM ]USER: <image>\\nquestion ASSISTANT: answer</s>USER: ... ASSISTANT: ...</s>

``vicuna_v1`` (LLaVA-1.5, ``--version v1`` in training, ``--conv-mode vicuna_v1`` in evaluation)
starts with LLaVA's system prompt; ``tiny`` (the tiny model, whose tokenizer has ``USER:`` and
``ASSISTANT:`` as single tokens) has none. The training encoder (:mod:`icons.data.encode`) renders
records with :meth:`ChatTemplate.render`; the export writes :meth:`ChatTemplate.jinja` into the
tokenizer and processor, so lmms-eval's prompts tokenize exactly as training did (tested).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"
#: LLaVA's ``conv_vicuna_v1.system``
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    #: ``<image>`` moved to the front of its turn, as LLaVA's ``preprocess_multimodal`` does
    image_first: bool = True

    def turns(self, record: dict, with_answer: bool) -> list[tuple[str, str]]:
        """(role, text) in LLaVA's order: a leading non-human turn skipped, roles alternating,
        ``<image>`` moved to the front of its turn (``"<image>\\n" + rest.strip()``, LLaVA's
        ``preprocess_multimodal``) when ``image_first``. ``with_answer=False`` drops the last (gpt) turn: the prompt a
        model generates that answer from."""
        conv = list(record["conversations"])
        if conv and conv[0]["from"] != "human":
            conv = conv[1:]  # LLaVA's preprocess: "Skip the first one if it is not from human"
        if not with_answer:
            if not conv or conv[-1]["from"] != "gpt":
                raise ValueError(f"record {record.get('id')!r}: the last turn must be the answer to generate")
            conv = conv[:-1]
        out = []
        for i, t in enumerate(conv):
            role = {"human": self.roles[0], "gpt": self.roles[1]}.get(t["from"])
            if role is None or role != self.roles[i % 2]:
                raise ValueError(f"record {record.get('id')!r}: turn {i} is from {t['from']!r}; turns must "
                                 f"alternate human, gpt starting with human")
            text = t["value"]
            if self.image_first and IMAGE_TOKEN in text:
                text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
            out.append((role, text))
        return out

    def render(self, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans of the answers, each from the space after
        ``ASSISTANT:`` to its ``</s>``. A conversation that ends with the user's turn gets the
        generation prompt ``ASSISTANT:``."""
        text = self.system + self.sep if self.system else ""
        spans = []
        for role, msg in turns:
            text += role + ":"
            if role == self.roles[0]:
                text += " " + msg + self.sep
            else:  # the span starts at the space: LLaVA's preprocess_v1 keeps the '▁' a SentencePiece
                start = len(text)  # tokenizer writes before a digit answer in the loss
                text += " " + msg + self.sep2
                spans.append((start, len(text)))
        if not turns or turns[-1][0] == self.roles[0]:
            text += self.roles[1] + ":"
        return text, spans

    def jinja(self, bos: bool) -> str:
        """:meth:`render` as a Jinja chat template over HF messages, for string contents
        (lmms-eval's, with their own ``<image>\\n``) and lists of parts (images first, as LLaVA
        moves them). A system message replaces the template's system prompt. ``bos``: write
        ``<s>`` when the tokenizer does not add it itself."""
        user, assistant = self.roles
        return "".join([
            "{% set ns = namespace(system=" + json.dumps(self.system) + ") %}",
            "{% for m in messages if m['role'] == 'system' %}{% set ns.system = " + _content("m['content']") + " %}"
            "{% endfor %}",
            "{{ bos_token }}" if bos else "",
            "{% if ns.system %}{{ ns.system }}" + self.sep + "{% endif %}",
            "{% for m in messages if m['role'] != 'system' %}",
            "{% if m['role'] == 'user' %}" + user + ": {{ " + _content("m['content']") + " }}" + self.sep,
            "{% else %}" + assistant + ": {{ " + _content("m['content']") + " }}" + self.sep2 + "{% endif %}",
            "{% endfor %}",
            "{% if add_generation_prompt %}" + assistant + ":{% endif %}",
        ])


def _content(var: str) -> str:
    """Jinja expression of a message's text: a string as it is, or a list of parts with the images
    first."""
    images = f"({var} | selectattr('type', 'equalto', 'image') | list | length)"
    texts = f"({var} | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' '))"
    return f"({var} if {var} is string else '<image>\\n' * {images} ~ {texts})"


TEMPLATES = {"tiny": ChatTemplate("tiny", "", image_first=False),
             "vicuna_v1": ChatTemplate("vicuna_v1", VICUNA_SYSTEM)}


def template_named(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def speaks_vicuna(model_cfg: Any) -> bool:
    """The model speaks LLaVA-1.5's vicuna_v1 prompt (kinds llava_1_5 and hf_llava); else the
    tiny model's own."""
    return model_cfg.get("template", "tiny") == "vicuna_v1"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts ``<s>`` in front by itself (then the template must not)."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id
