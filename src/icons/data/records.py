"""LLaVA-format files read record by record, and the problems reading them can report.

A ``.json`` file (a list of records) or a ``.jsonl`` file (one record per line) is read in pieces,
never whole (:func:`iter_spans`), so a several-GB pool is scanned in about one chunk of memory.
Every problem is one dict (file, position, line, id, field, kind, message) and prints as one line
(:func:`format_problem`); a problem with the file as a whole raises :class:`PoolFileError`.

Positions: ``position`` is the 0-based index of the record in the file (for ``.jsonl``, among its
non-blank lines); ``line`` is the 1-based line number of a ``.jsonl`` record (None for ``.json``).
"""
from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

__all__ = ["BadInputError", "FILE_PROBLEM_KINDS", "PROBLEM_KINDS", "PoolFileError", "file_signature",
           "format_problem", "is_jsonl", "iter_records", "iter_spans", "parse_line", "problem", "summary_error"]

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
    "wrong_task",                 # a task file's record whose 'task' names another task
    "bad_subtask",                # a task file's record whose 'subtask' is not a non-empty string
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
#: bytes decoded at a time when a .json file is scanned (its records are never all in memory)
CHUNK = 1 << 24
_BOM = b"\xef\xbb\xbf"
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
#: what a top level that is not a list is, by its first character
_TOP_TYPES = {"{": "dict", '"': "str", "t": "bool", "f": "bool", "n": "NoneType", "-": "number",
              **{d: "number" for d in "0123456789"}}


def _json_error_message(err: json.JSONDecodeError) -> str:
    return f"invalid JSON at column {err.colno}: {err.msg}"


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".ndjson")


def iter_spans(path: str | Path) -> Iterator[tuple[int, int, int, Any]]:
    """``(start, end, line, payload)`` of every record of a ``.json`` or ``.jsonl`` file, in order.

    ``start``/``end``: the record's byte span (``.jsonl``: its whole line); ``line``: the 1-based
    line it starts on. ``payload``: the raw line (``.jsonl``, parsed by the caller so that a bad
    line is a problem of that record only) or the parsed value (``.json``, where bad JSON or bytes
    that are not UTF-8 break the whole file: :class:`PoolFileError`). Either way the file is read
    in pieces, never whole.
    """
    path = Path(path)
    if not path.is_file():
        raise _file_error(path, "missing_file", "file does not exist" if not path.exists() else "is not a file")
    if is_jsonl(path):
        yield from _jsonl_spans(path)
    elif path.suffix.lower() == ".json":
        yield from _json_spans(path)
    else:
        raise _file_error(path, "bad_file_type",
                          f"expected a .json (list of records) or .jsonl file, got {path.suffix.lower()!r}")


def iter_records(path: str | Path) -> Iterator[tuple[int, int | None, Any, dict | None]]:
    """``(position, line, record, problem)`` for every record of a ``.json`` or ``.jsonl`` file.

    ``record`` is the parsed JSON value (None when the line could not be parsed, then ``problem``
    says why); ``line`` is None for a ``.json`` record. Raises :class:`PoolFileError` for a
    problem with the file as a whole (see :func:`iter_spans`).
    """
    jsonl = is_jsonl(path)
    for pos, (_, _, line, payload) in enumerate(iter_spans(path)):
        if jsonl:
            yield (pos, line, *parse_line(path, pos, line, payload))
        else:
            yield pos, None, payload, None


def _jsonl_spans(path: Path) -> Iterator[tuple[int, int, int, bytes]]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                yield start, offset, lineno, raw


def parse_line(path: str | Path, pos: int, lineno: int, raw: bytes) -> tuple[Any, dict | None]:
    """``(record, None)`` or ``(None, problem)`` for one ``.jsonl`` line."""
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return None, problem(path, pos, lineno, None, None, "not_utf8",
                             f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not valid UTF-8")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, problem(path, pos, lineno, None, None, "invalid_json", _json_error_message(err))


class _JsonText:
    """A UTF-8 file's text decoded chunk by chunk, with the byte offset, line and column of a cursor
    (text before the cursor is dropped, so memory stays about one chunk)."""

    def __init__(self, path: Path, f, chunk: int):
        self.path, self.f, self.chunk = path, f, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.byte = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        f.seek(self.byte)
        self.read = self.byte
        self.buf, self.pos, self.line, self.col = "", 0, 1, 0
        self.eof = False

    def more(self) -> bool:
        """Append the next chunk; False when the file was already read to its end."""
        if self.eof:
            return False
        raw = self.f.read(self.chunk)
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as err:
            pending = len(err.object) - len(raw)  # bytes of a character cut by the previous chunk
            raise self._not_utf8(self.read - pending + err.start, err.object[err.start]) from None
        self.read += len(raw)
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return True

    def advance(self, to: int) -> None:
        seg = self.buf[self.pos:to]
        self.byte += len(seg.encode("utf-8"))
        newlines = seg.count("\n")
        self.line += newlines
        self.col = len(seg) - seg.rfind("\n") - 1 if newlines else self.col + len(seg)
        self.pos = to

    def peek(self) -> str | None:
        """Skip whitespace; the next character (None at the end of the file)."""
        while True:
            end = _SPACE.match(self.buf, self.pos).end()
            self.advance(end)
            if end < len(self.buf):
                return self.buf[end]
            if not self.more():
                return None

    def value(self) -> tuple[Any, int, int]:
        """The JSON value at the cursor, its start byte and line; the cursor moves past it."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self.more():  # the value may go on in the next chunk
                    continue
                raise self.invalid(err.msg, err.pos) from None
            if end == len(self.buf) and self.more():  # a number or literal may go on, too
                continue
            start, line = self.byte, self.line
            self.advance(end)
            return value, start, line

    def invalid(self, msg: str, at: int) -> PoolFileError:
        seg = self.buf[self.pos:at]
        newlines = seg.count("\n")
        col = (len(seg) - seg.rfind("\n") - 1 if newlines else self.col + len(seg)) + 1
        return _file_error(self.path, "invalid_json_file", f"invalid JSON at column {col}: {msg}",
                           line=self.line + newlines)

    def _not_utf8(self, offset: int, byte: int) -> PoolFileError:
        with open(self.path, "rb") as f:  # the line of a bad byte: count newlines up to it (an error path only)
            line, left = 1, offset
            while left > 0:
                block = f.read(min(self.chunk, left))
                line, left = line + block.count(b"\n"), left - len(block)
        return _file_error(self.path, "file_not_utf8",
                           f"byte 0x{byte:02x} at offset {offset} is not valid UTF-8 (LLaVA files are UTF-8)",
                           line=line)


def _json_spans(path: Path, chunk: int | None = None) -> Iterator[tuple[int, int, int, Any]]:
    """The elements of a top-level JSON list, one at a time, with their byte spans."""
    with open(path, "rb") as f:
        text = _JsonText(path, f, chunk or CHUNK)
        first = text.peek()
        if first != "[":
            if first in _TOP_TYPES:
                raise _file_error(path, "not_a_list", f"top level is a JSON {_TOP_TYPES[first]}, expected a list of "
                                                      f"records (use .jsonl for one record per line)")
            raise text.invalid("Expecting value", text.pos)
        text.advance(text.pos + 1)
        nxt = text.peek()
        while nxt != "]":
            value, start, line = text.value()
            yield start, text.byte, line, value
            nxt = text.peek()
            if nxt == ",":
                text.advance(text.pos + 1)
                text.peek()
            elif nxt != "]":
                raise text.invalid("Expecting ',' delimiter", text.pos)
        text.advance(text.pos + 1)
        if text.peek() is not None:
            raise text.invalid("Extra data", text.pos)


def summary_error(problems: list[dict], hint: str = "") -> str:
    """One line: the first problem, how many there are in all, and where they are all listed."""
    more = len(problems) - 1
    tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"bad input: {format_problem(problems[0])}{tail}{hint}"


def file_signature(path: str | Path) -> dict:
    """Size and modification time of a file (part of a stage key: an edited file is read again)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path), "missing": True}
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
