"""Read and validate LLaVA-format records: a ``.json`` list or a ``.jsonl`` file, record by record.

Public API::

    result = read_pool(path, image_root=None, on_bad_record="error", encoder=None)
    result.records    # the good records (ids exactly as given, in file order)
    result.problems   # one dict per problem: file, position, line, id, field, kind, message
    result.stats      # records, ok, with_image, text_only, problems by kind, fixes, image modes, ...

    result = validate_records(records, file="...", image_root=...)   # records already in memory

A record is good when it has an id (string or integer, unique in the file), a non-empty
``conversations`` list whose turns alternate ``human``/``gpt`` starting with ``human`` and ending
with ``gpt`` (each turn an object with a string ``value``), at most one ``<image>`` token and only
in human turns, a ``<image>`` token only when it has an ``image``, and an ``image`` (path relative
to ``image_root`` unless absolute) that exists and decodes completely. Given an
:class:`~icons.data.encode.Encoder`, a record must also fit the model: a prompt whose image tokens
would be cut by ``max_length`` is a problem; a record whose answer text is cut is counted
(``stats["truncated"]``) and listed in ``result.truncated``, never dropped.

Two repairs are made and counted, as LLaVA's own loader does: an image record without ``<image>``
gets ``"<image>\\n"`` at the start of its first human turn (``stats["fixes"]``), and an image in any
mode (RGBA, L, P, CMYK, ...) is accepted because the encoder converts it to RGB
(``stats["image_modes"]`` counts the modes that are not RGB).

Positions: ``position`` is the 0-based index of the record in the file (for ``.jsonl``, among its
non-blank lines); ``line`` is the 1-based line number of a ``.jsonl`` record (None for ``.json``).
A problem with the file itself (missing, not UTF-8, invalid JSON in a ``.json`` file, not a list,
no records) raises :class:`PoolFileError`; a bad record is a problem of that record only, which
``on_bad_record="skip"`` skips and ``"error"`` turns into a :class:`BadInputError` naming the first.
"""
from __future__ import annotations

import json
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from .encode import image_path

__all__ = [
    "BadInputError",
    "FILE_PROBLEM_KINDS",
    "IMAGE_TOKEN",
    "PROBLEM_KINDS",
    "PoolFileError",
    "ReadResult",
    "file_signature",
    "format_problem",
    "inspect_image",
    "iter_records",
    "read_pool",
    "scan_file",
    "summary_error",
    "validate_records",
]

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")

#: kinds of record problems (``problem["kind"]``)
PROBLEM_KINDS = (
    "invalid_json",               # a .jsonl line that is not JSON
    "not_utf8",                   # a .jsonl line with bytes that are not UTF-8
    "not_object",                 # a record that is not a JSON object
    "missing_id", "bad_id", "duplicate_id",
    "missing_conversations", "bad_conversations", "empty_conversations",
    "bad_turn", "unknown_role", "role_order",
    "image_token_without_image",  # '<image>' in the text, no 'image' field
    "image_token_count",          # more than one '<image>' (one image per record)
    "image_token_in_answer",      # '<image>' in a gpt turn
    "bad_image_field",            # 'image' is not a non-empty string
    "missing_image", "not_an_image", "truncated_image", "broken_image",
    "too_long",                   # image tokens (or every answer token) beyond model.max_length
)
#: kinds of problems with a whole file (always fatal, also under on_bad_record=skip)
FILE_PROBLEM_KINDS = ("missing_file", "bad_file_type", "file_not_utf8", "invalid_json_file", "not_a_list",
                      "empty_file", "task_name_collision", "unknown_task")


class BadInputError(ValueError):
    """Bad input data. ``str(err)`` is one line naming file, position, id, field and the problem."""

    def __init__(self, message: str, problems: list[dict] | None = None):
        super().__init__(message)
        self.problems = problems or []


class PoolFileError(BadInputError):
    """The file as a whole cannot be read as LLaVA records (``problems`` holds one file problem)."""


def problem(file: str | Path, position: int | None, line: int | None, rid: Any, field_: str | None, kind: str,
            message: str) -> dict:
    return {"file": str(file), "position": position, "line": line, "id": rid, "field": field_, "kind": kind,
            "message": message}


def format_problem(p: dict) -> str:
    """One line: ``<file> line L record P id 'x': field 'f': <message> [kind]``."""
    where = [p["file"]]
    if p.get("line") is not None:
        where.append(f"line {p['line']}")
    if p.get("position") is not None:
        where.append(f"record {p['position']}")
    if p.get("id") is not None:
        where.append(f"id {p['id']!r}")
    head = " ".join(where)
    fld = f"field '{p['field']}': " if p.get("field") else ""
    return f"{head}: {fld}{p['message']} [{p['kind']}]".replace("\n", "\\n")


def _file_error(file: Path, kind: str, message: str, line: int | None = None, field_: str | None = None):
    p = problem(file, None, line, None, field_, kind, message)
    return PoolFileError(format_problem(p), [p])


# --------------------------------------------------------------------------- reading
def _json_error_message(err: json.JSONDecodeError) -> str:
    return f"invalid JSON at column {err.colno}: {err.msg}"


def iter_records(path: str | Path) -> Iterator[tuple[int, int | None, Any, dict | None]]:
    """``(position, line, record, problem)`` for every record of a ``.json`` or ``.jsonl`` file.

    ``record`` is the parsed JSON value (None when the line could not be parsed, then ``problem``
    says why). A ``.jsonl`` file is read line by line (never whole); a ``.json`` file must be one
    list. Raises :class:`PoolFileError` for a problem with the file as a whole.
    """
    path = Path(path)
    if not path.is_file():
        raise _file_error(path, "missing_file", "file does not exist" if not path.exists() else "is not a file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    else:
        raise _file_error(path, "bad_file_type", f"expected a .json (list of records) or .jsonl file, got {suffix!r}")


def _iter_json(path: Path) -> Iterator[tuple[int, int | None, Any, dict | None]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise _file_error(path, "file_not_utf8",
                          f"byte 0x{raw[err.start]:02x} at offset {err.start} is not valid UTF-8 "
                          f"(LLaVA files are UTF-8)", line=line) from None
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _file_error(path, "invalid_json_file", _json_error_message(err), line=err.lineno) from None
    del text
    if not isinstance(data, list):
        raise _file_error(path, "not_a_list", f"top level is a JSON {type(data).__name__}, expected a list of "
                                              f"records (use .jsonl for one record per line)")
    for pos, rec in enumerate(data):
        yield pos, None, rec, None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, int | None, Any, dict | None]]:
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield pos, lineno, None, problem(
                    path, pos, lineno, None, None, "not_utf8",
                    f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not valid UTF-8")
                pos += 1
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as err:
                yield pos, lineno, None, problem(path, pos, lineno, None, None, "invalid_json",
                                                 _json_error_message(err))
            else:
                yield pos, lineno, rec, None
            pos += 1


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
    problems: list[dict] = field(default_factory=list)
    #: records whose answer text was cut to max_length: {file, position, line, id, tokens, max_length}
    truncated: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def bad_positions(self) -> list[int]:
        return sorted({p["position"] for p in self.problems if p["position"] is not None})

    def raise_if_bad(self, hint: str = "") -> None:
        """Raise :class:`BadInputError` naming the first problem (one line) if there is any."""
        if self.problems:
            raise BadInputError(summary_error(self.problems, hint), self.problems)


def summary_error(problems: list[dict], hint: str = "") -> str:
    """One line: the first problem, how many there are in all, and where they are all listed."""
    more = len(problems) - 1
    tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"bad input: {format_problem(problems[0])}{tail}{hint}"


class _Validator:
    def __init__(self, file: str | Path, image_root: str | Path | None, encoder=None, with_answer: bool = True):
        self.file = str(file)
        self.image_root = Path(image_root) if image_root is not None else None
        self.encoder = encoder
        self.with_answer = with_answer
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
        self._check_id(rec, pos, bad)
        has_image = rec.get("image") is not None
        self.counts["with_image" if has_image else "text_only"] += 1
        fixed = self._check_conversations(rec, has_image, bad)
        mode = self._check_image(rec, has_image, bad) if has_image else None
        if fixed is not None and not probs and self.encoder is not None:
            self._check_length(fixed, pos, line, has_image, bad)
        if probs:
            self._bad(probs)
            return
        if mode is not None and mode != "RGB":
            self.modes[mode] += 1
        self.result.records.append(fixed)
        self.result.positions.append(pos)

    def _bad(self, probs: list[dict]) -> None:
        self.counts["bad"] += 1
        self.result.problems.extend(probs)
        self.kinds.update(p["kind"] for p in probs)

    def _check_id(self, rec: dict, pos: int, bad) -> None:
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
        if first != pos:
            bad("id", "duplicate_id", f"id {rid!r} is already used by record {first} (ids must be unique)")

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
        if has_image and n_human == 0:
            # LLaVA puts the image first in the first human turn
            conv = [dict(conv[0], value=f"{IMAGE_TOKEN}\n{conv[0]['value']}"), *conv[1:]]
            self.fixes["image_token_inserted"] += 1
            return dict(rec, conversations=conv)
        return rec

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
        r.stats = {"records": self.counts["records"], "ok": len(r.records), "bad": self.counts["bad"],
                   "with_image": self.counts["with_image"], "text_only": self.counts["text_only"],
                   "problems": dict(sorted(self.kinds.items())), "fixes": dict(sorted(self.fixes.items())),
                   "image_modes": dict(sorted(self.modes.items())), "truncated": self.counts["truncated"]}
        return r


def validate_records(records: Iterable[Any], *, file: str | Path = "<records>", image_root: str | Path | None = None,
                     encoder=None, with_answer: bool = True) -> ReadResult:
    """Validate records already in memory (positions = their order). See the module docstring."""
    v = _Validator(file, image_root, encoder, with_answer)
    for pos, rec in enumerate(records):
        v.add(pos, None, rec)
    return v.finish()


def scan_file(path: str | Path, image_root: str | Path | None = None, *, encoder=None,
              with_answer: bool = True) -> ReadResult:
    """Validate every record of a file and return all of it (good records, problems, counts), with
    no policy: only a problem with the file as a whole raises (:class:`PoolFileError`)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    v = _Validator(path, root, encoder, with_answer)
    for pos, line, rec, prob in iter_records(path):
        v.add(pos, line, rec, prob)
    return v.finish()


def read_pool(path: str | Path, image_root: str | Path | None = None, on_bad_record: str = "error", *,
              encoder=None, with_answer: bool = True) -> ReadResult:
    """Read and validate a LLaVA ``.json``/``.jsonl`` file.

    ``image_root`` defaults to the file's directory. ``on_bad_record="error"`` raises
    :class:`BadInputError` (one line, the first problem) after reading the whole file when any
    record is bad; ``"skip"`` returns the good records and the problems. A file problem, or a
    file without any (good) record, raises :class:`PoolFileError` in both modes.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record={on_bad_record!r} must be 'error' or 'skip'")
    path = Path(path)
    result = scan_file(path, image_root, encoder=encoder, with_answer=with_answer)
    if result.stats["records"] == 0:
        raise _file_error(path, "empty_file", "contains no records")
    if on_bad_record == "error":
        result.raise_if_bad()
    if not result.records:
        raise _file_error(path, "empty_file",
                          f"none of its {result.stats['records']} records is usable "
                          f"(first problem: {format_problem(result.problems[0])})")
    return result


def file_signature(path: str | Path) -> dict:
    """Size and modification time of a file (part of a stage key: an edited file is read again)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path), "missing": True}
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
