"""Read and validate LLaVA-format records: a ``.json`` list or a ``.jsonl`` file, record by record.

Public API::

    result = read_pool(path, image_root=None, on_bad_record="error", encoder=None)
    result.records    # the good records (ids exactly as given, in file order)
    result.problems   # one dict per problem: file, position, line, id, field, kind, message
    result.stats      # records, ok, with_image, text_only, problems by kind, fixes, image modes, ...

    result = validate_records(records, file="...", image_root=...)   # records already in memory

A record is good when it has an id (string or integer: a label, kept as given; a repeated one is
listed in ``result.repeated`` with both positions, and is a problem only with
``repeated_ids="error"``: a record's identity is its position in the file), a non-empty
``conversations`` list whose turns alternate ``human``/``gpt`` starting with ``human`` and ending
with ``gpt`` (each turn an object with a string ``value``), at most one ``<image>`` token and only
in human turns, a ``<image>`` token only when it has an ``image``, and an ``image`` (path relative
to ``image_root`` unless absolute) that exists and decodes completely. An ``image`` of null, ``""``,
``"None"``, ``"none"`` or ``"nan"`` means text-only, as Cambrian's loader reads it. Given an
:class:`~icons.data.encode.Encoder`, a record must also fit the model: a prompt whose image tokens
would be cut by ``max_length`` is a problem; a record whose answer text is cut is counted
(``stats["truncated"]``) and listed in ``result.truncated``, never dropped.

Two repairs are made and counted, as LLaVA's own loader does: an image record without ``<image>``
gets ``"<image>\\n"`` at the start of its first human turn (``stats["fixes"]``), and an image in any
mode (RGBA, L, P, CMYK, ...) is accepted because the encoder converts it to RGB
(``stats["image_modes"]`` counts the modes that are not RGB).

Memory: files are read in pieces (:func:`~icons.data.records.iter_spans`); with ``keep_records=False`` only the good
records' positions and ids are kept, so a several-GB pool is validated without holding it (the
pool itself is then read lazily: :mod:`icons.data.pool`).

Positions: ``position`` is the 0-based index of the record in the file (for ``.jsonl``, among its
non-blank lines); ``line`` is the 1-based line number of a ``.jsonl`` record (None for ``.json``).
A problem with the file itself (missing, not UTF-8, invalid JSON in a ``.json`` file, not a list,
no records) raises :class:`PoolFileError`; a bad record is a problem of that record only, which
``on_bad_record="skip"`` skips and ``"error"`` turns into a :class:`BadInputError` naming the first.
"""
from __future__ import annotations

import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

from .encode import has_image, image_path
# the reading half (records.py): what a caller of this module also needs to name
from .records import (FILE_PROBLEM_KINDS, PROBLEM_KINDS, BadInputError, PoolFileError, _file_error, file_signature,
                      format_problem, is_jsonl, iter_records, iter_spans, parse_line, problem, summary_error)

__all__ = [
    "BadInputError", "FILE_PROBLEM_KINDS", "IMAGE_TOKEN", "PROBLEM_KINDS", "PoolFileError", "ReadResult",
    "apply_policy", "file_signature", "format_problem", "inspect_image", "is_jsonl", "iter_records", "iter_spans",
    "parse_line", "problem", "read_pool", "scan_file", "summary_error", "validate_records", "with_image_token",
]

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
#: what a repeated id is: ``warn`` (a label shared by several records, listed and kept: LLaVA-665K's
#: COCO-derived records carry their image's id) or ``error`` (a problem of the later record)
REPEATED_IDS = ("warn", "error")


# --------------------------------------------------------------------------- images
def inspect_image(path: str | Path) -> tuple[str | None, str | None, str | None]:
    """``(mode, kind, message)`` of an image file: ``kind``/``message`` are None when it decodes
    completely (mode = the file's own mode, converted to RGB by the encoder)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, "missing_image", f"image file {path} does not exist"
    except OSError as err:
        return None, "missing_image", f"image file {path} cannot be read ({err.strerror or err})"
    if not stat.S_ISREG(st.st_mode):
        return None, "missing_image", f"image path {path} is not a file"
    if st.st_size == 0:
        return None, "not_an_image", f"image file {path} is empty (0 bytes)"
    return _inspect_image(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=1 << 20)
def _inspect_image(path: str, size: int, mtime_ns: int) -> tuple[str | None, str | None, str | None]:
    # (size, mtime) are part of the cache key: a file rewritten in place is inspected again
    mode = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency, large-image warnings
            with Image.open(path) as im:
                mode = im.mode
                im.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale, still reading every byte
                im.load()
                im.convert("RGB")  # what the encoder does
    except UnidentifiedImageError:
        return mode, "not_an_image", f"file {path} is not an image PIL can read (or its header is cut)"
    except Image.DecompressionBombError as err:
        return mode, "broken_image", f"image {path} is too large to decode: {err}"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        msg = str(err) or type(err).__name__
        kind = "truncated_image" if "truncat" in msg.lower() or isinstance(err, EOFError) else "broken_image"
        return mode, kind, f"image {path} does not decode: {msg}"
    return mode, None, None


# --------------------------------------------------------------------------- validation
@dataclass
class ReadResult:
    """What reading/validating a file gave: good records, problems, counts."""

    file: str
    records: list[dict] = field(default_factory=list)
    #: 0-based position in the file of each good record (aligned with ``records``)
    positions: list[int] = field(default_factory=list)
    #: id of each good record (aligned with ``positions``; kept also when ``records`` is not)
    ids: list = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    #: records whose answer text was cut to max_length: {file, position, line, id, tokens, max_length}
    truncated: list[dict] = field(default_factory=list)
    #: records whose id an earlier record already has: {file, position, line, id, first_position}
    repeated: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def bad_positions(self) -> list[int]:
        return sorted({p["position"] for p in self.problems if p["position"] is not None})

    def raise_if_bad(self, hint: str = "") -> None:
        """Raise :class:`BadInputError` naming the first problem (one line) if there is any."""
        if self.problems:
            raise BadInputError(summary_error(self.problems, hint), self.problems)


def with_image_token(rec: dict) -> dict:
    """LLaVA's repair: an image record without ``<image>`` in any human turn gets it at the start
    of its first human turn (the record itself is returned when nothing is missing)."""
    if not has_image(rec):
        return rec
    conv = rec["conversations"]
    if any(t["from"] == "human" and IMAGE_TOKEN in t["value"] for t in conv):
        return rec
    return dict(rec, conversations=[dict(conv[0], value=f"{IMAGE_TOKEN}\n{conv[0]['value']}"), *conv[1:]])


class _Validator:
    def __init__(self, file: str | Path, image_root: str | Path | None, encoder=None, with_answer: bool = True,
                 keep_records: bool = True, task: str | None = None, repeated_ids: str = "warn"):
        self.file = str(file)
        self.image_root = Path(image_root) if image_root is not None else None
        self.encoder = encoder
        self.with_answer = with_answer
        self.keep_records = keep_records
        self.task = task
        if repeated_ids not in REPEATED_IDS:
            raise ValueError(f"repeated_ids={repeated_ids!r} must be one of {', '.join(REPEATED_IDS)}")
        self.repeated_ids = repeated_ids
        self.seen: dict[Any, int] = {}
        self.result = ReadResult(self.file)
        self.counts = Counter()
        self.kinds = Counter()
        self.fixes = Counter()
        self.modes = Counter()
        self._dummy = None

    def add(self, pos: int, line: int | None, rec: Any, parse_problem: dict | None = None) -> None:
        self.counts["records"] += 1
        if parse_problem is not None:
            self._bad([parse_problem])
            return
        probs: list[dict] = []

        def bad(field_: str | None, kind: str, message: str) -> None:
            probs.append(problem(self.file, pos, line, rid, field_, kind, message))

        rid = None
        if not isinstance(rec, dict):
            bad(None, "not_object", f"record is a JSON {type(rec).__name__}, expected an object")
            self._bad(probs)
            return
        rid = rec.get("id")
        self._check_id(rec, pos, line, bad)
        if self.task is not None:
            self._check_task(rec, bad)
        image = has_image(rec)
        self.counts["with_image" if image else "text_only"] += 1
        fixed = self._check_conversations(rec, image, bad)
        mode = self._check_image(rec, image, bad) if image else None
        if fixed is not None and not probs and self.encoder is not None:
            self._check_length(fixed, pos, line, image, bad)
        if probs:
            self._bad(probs)
            return
        if mode is not None and mode != "RGB":
            self.modes[mode] += 1
        if self.keep_records:
            self.result.records.append(fixed)
        self.result.positions.append(pos)
        self.result.ids.append(rid)

    def _bad(self, probs: list[dict]) -> None:
        self.counts["bad"] += 1
        self.result.problems.extend(probs)
        self.kinds.update(p["kind"] for p in probs)

    def _check_id(self, rec: dict, pos: int, line: int | None, bad) -> None:
        if "id" not in rec:
            bad("id", "missing_id", "record has no 'id' (every row is kept by its id)")
            return
        rid = rec["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            bad("id", "bad_id", f"must be a string or an integer, got {type(rid).__name__}")
            return
        if isinstance(rid, str) and not rid.strip():
            bad("id", "bad_id", "must not be empty")
            return
        first = self.seen.setdefault(rid, pos)
        if first == pos:
            return
        if self.repeated_ids == "error":
            bad("id", "duplicate_id", f"id {rid!r} is already used by record {first} (data.repeated_ids=error)")
        else:  # LLaVA-665K's COCO-derived records share their image's id: a label, kept, listed
            self.counts["repeated_ids"] += 1
            self.result.repeated.append({"file": self.file, "position": pos, "line": line, "id": rid,
                                         "first_position": first})

    def _check_task(self, rec: dict, bad) -> None:
        # a task file's records belong to its task (a file saved under another task's name is caught)
        if rec.get("task", self.task) != self.task:
            bad("task", "wrong_task", f"names task {rec['task']!r}, but this is the {self.task!r} file")
        sub = rec.get("subtask")
        if sub is not None and (not isinstance(sub, str) or not sub.strip()):
            bad("subtask", "bad_subtask", f"must be a non-empty string (the sub-task's group), got {sub!r}")

    def _check_conversations(self, rec: dict, has_image: bool, bad) -> dict | None:
        """The record with the repairs applied (or None when its conversations are unusable)."""
        if "conversations" not in rec:
            bad("conversations", "missing_conversations", "missing (a list of human/gpt turns is required)")
            return None
        conv = rec["conversations"]
        if not isinstance(conv, list):
            bad("conversations", "bad_conversations", f"must be a list of turns, got {type(conv).__name__}")
            return None
        if not conv:
            bad("conversations", "empty_conversations", "is an empty list (at least one human and one gpt turn)")
            return None
        for k, turn in enumerate(conv):
            f = f"conversations[{k}]"
            if not isinstance(turn, dict):
                bad(f, "bad_turn", f"must be an object with 'from' and 'value', got {type(turn).__name__}")
                return None
            role = turn.get("from")
            if role not in ROLES:
                bad(f"{f}.from", "unknown_role", f"unknown role {role!r} (expected 'human' or 'gpt')")
                return None
            expected = ROLES[k % 2]
            if role != expected:
                bad(f"{f}.from", "role_order",
                    f"expected {expected!r}, got {role!r} (turns must alternate human/gpt starting with human)")
                return None
            if not isinstance(turn.get("value"), str):
                bad(f"{f}.value", "bad_turn", f"must be a string, got {type(turn.get('value')).__name__}")
                return None
        if conv[-1]["from"] != "gpt":
            bad(f"conversations[{len(conv) - 1}].from", "role_order",
                "the conversation ends with a human turn that has no gpt answer")
            return None
        ok = True
        n_human = 0
        for k, turn in enumerate(conv):
            n = turn["value"].count(IMAGE_TOKEN)
            if turn["from"] == "gpt" and n:
                bad(f"conversations[{k}].value", "image_token_in_answer", "a gpt answer contains '<image>'")
                ok = False
            elif turn["from"] == "human":
                n_human += n
        if not has_image and n_human:
            bad("image", "image_token_without_image",
                "the text has '<image>' but the record has no 'image' field")
            ok = False
        if has_image and n_human > 1:
            bad("conversations", "image_token_count",
                f"has {n_human} '<image>' tokens; one image per record is supported")
            ok = False
        if not ok:
            return None
        fixed = with_image_token(rec)
        if fixed is not rec:
            self.fixes["image_token_inserted"] += 1
        return fixed

    def _check_image(self, rec: dict, has_image: bool, bad) -> str | None:
        value = rec["image"]
        if not isinstance(value, str) or not value.strip():
            bad("image", "bad_image_field",
                f"must be a non-empty path string, got {value!r}" if isinstance(value, str)
                else f"must be a path string (one image per record), got {type(value).__name__}")
            return None
        mode, kind, message = inspect_image(image_path(rec, self.image_root))  # resolved as the encoder does
        if kind is not None:
            bad("image", kind, message)
        return mode

    def _check_length(self, rec: dict, pos: int, line: int | None, has_image: bool, bad) -> None:
        enc = self.encoder
        if has_image and self._dummy is None:
            import numpy as np

            self._dummy = np.zeros((enc.image_size, enc.image_size, 3), np.uint8)
        try:
            e = enc.encode(rec, with_answer=self.with_answer, pixels=self._dummy if has_image else None)
        except ValueError:
            n = self._length(rec)
            bad("conversations", "too_long",
                f"the prompt with its image is {n} tokens, longer than model.max_length={enc.max_length}: "
                f"the image tokens would be cut")
            return
        if not e.truncated:
            return
        n = self._length(rec)
        if self.with_answer and not any(lab != -100 for lab in e.labels):
            bad("conversations", "too_long",
                f"is {n} tokens; no answer token fits in model.max_length={enc.max_length}")
            return
        self.counts["truncated"] += 1
        self.result.truncated.append({"file": self.file, "position": pos, "line": line, "id": rec.get("id"),
                                      "tokens": n, "max_length": enc.max_length})

    def _length(self, rec: dict) -> int:
        conv = rec["conversations"] if self.with_answer else rec["conversations"][:-1]
        return self.encoder.length({"conversations": conv})

    def finish(self) -> ReadResult:
        r = self.result
        r.stats = {"records": self.counts["records"], "ok": len(r.positions), "bad": self.counts["bad"],
                   "with_image": self.counts["with_image"], "text_only": self.counts["text_only"],
                   "problems": dict(sorted(self.kinds.items())), "fixes": dict(sorted(self.fixes.items())),
                   "image_modes": dict(sorted(self.modes.items())), "truncated": self.counts["truncated"],
                   "repeated_ids": self.counts["repeated_ids"]}
        return r


def validate_records(records: Iterable[Any], *, file: str | Path = "<records>", image_root: str | Path | None = None,
                     encoder=None, with_answer: bool = True, repeated_ids: str = "warn") -> ReadResult:
    """Validate records already in memory (positions = their order). See the module docstring."""
    v = _Validator(file, image_root, encoder, with_answer, repeated_ids=repeated_ids)
    for pos, rec in enumerate(records):
        v.add(pos, None, rec)
    return v.finish()


def scan_file(path: str | Path, image_root: str | Path | None = None, *, encoder=None, with_answer: bool = True,
              keep_records: bool = True, task: str | None = None, repeated_ids: str = "warn") -> ReadResult:
    """Validate every record of a file and return all of it (good records, problems, counts), with
    no policy: only a problem with the file as a whole raises (:class:`PoolFileError`).

    ``keep_records=False``: only positions and ids of the good records are kept (a large pool).
    ``task``: the file is that task's set (records naming another ``task`` are problems)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    v = _Validator(path, root, encoder, with_answer, keep_records, task, repeated_ids)
    for pos, line, rec, prob in iter_records(path):
        v.add(pos, line, rec, prob)
    return v.finish()


def apply_policy(result: ReadResult, on_bad_record: str) -> ReadResult:
    """``on_bad_record="error"``: raise :class:`BadInputError` naming the first problem, if any;
    ``"skip"``: keep the good records. A file without any (good) record raises
    :class:`PoolFileError` under both."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record={on_bad_record!r} must be 'error' or 'skip'")
    path = Path(result.file)
    if result.stats["records"] == 0:
        raise _file_error(path, "empty_file", "contains no records")
    if on_bad_record == "error":
        result.raise_if_bad()
    if not result.stats["ok"]:
        raise _file_error(path, "empty_file",
                          f"none of its {result.stats['records']} records is usable "
                          f"(first problem: {format_problem(result.problems[0])})")
    return result


def read_pool(path: str | Path, image_root: str | Path | None = None, on_bad_record: str = "error", *,
              encoder=None, with_answer: bool = True, keep_records: bool = True, task: str | None = None,
              repeated_ids: str = "warn") -> ReadResult:
    """Read and validate a LLaVA ``.json``/``.jsonl`` file (:func:`scan_file`, then
    :func:`apply_policy`). ``image_root`` defaults to the file's directory. The whole file is read
    before ``on_bad_record="error"`` raises."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record={on_bad_record!r} must be 'error' or 'skip'")
    result = scan_file(path, image_root, encoder=encoder, with_answer=with_answer, keep_records=keep_records,
                       task=task, repeated_ids=repeated_ids)
    return apply_policy(result, on_bad_record)
