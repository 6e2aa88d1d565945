"""What usae reads from users: files checked before they are opened, text decoded in one place,
JSON checked against a schema on read. Every text file a user gives or may edit (a label CSV, an
image list, labels.json, config.json, a report) goes through :func:`read_user_text`; see
docs/reliability.md §12. ``_io`` re-exports these names beside the writing helpers.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from usae.errors import UsaeError


def one_line(e: object) -> str:
    """An exception or text squeezed onto one line of at most 200 characters (for error messages)."""
    text = " ".join(str(e).split())[:200]
    return text or e.__class__.__name__


FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` when it is a regular file (or a link to one), checked without opening it.

    Anything else is a one-line UsaeError naming it: missing, or a directory, FIFO, socket or
    device (opening a FIFO would block forever; reading a device never ends).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsaeError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UsaeError(f"{path}: {what} could not be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "special file")
        raise UsaeError(f"{path}: {what} is a {kind}, not a regular file")
    return Path(path)


def file_kind(path: Path) -> str:
    """'file', 'directory', or what else ``path`` is ('FIFO', 'socket', 'character device', 'broken link', ...),
    from one stat (links followed), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken link" if os.path.islink(path) else "missing file"
    except OSError:
        return "unreadable entry"
    if stat.S_ISREG(mode):
        return "file"
    return FILE_KINDS.get(stat.S_IFMT(mode), "special file")


# -- text a user may hand us ------------------------------------------------------------------------
USER_TEXT_MAX_BYTES = 1 << 30
"""The largest text file usae reads (a label CSV, an image list, a JSON file): 1 GiB. Larger is surely
not what was meant, and reading it whole would only exhaust memory; a CSV field may be this long."""
_BOMS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, None, "UTF-32"),
    (codecs.BOM_UTF32_BE, None, "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


def read_user_text(path: Path, what: str, max_bytes: int = USER_TEXT_MAX_BYTES) -> str:
    """The text of a file a user gives or may edit, read through one gate (docs/reliability.md §12).

    Regular files only (:func:`regular_file`: a FIFO never blocks the read), at most ``max_bytes``,
    decoded by its byte-order mark (UTF-8 or UTF-16) or else as UTF-8. Anything else is a one-line
    UsaeError naming the file and the encoding it is not.
    """
    path = regular_file(Path(path), what)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UsaeError(f"{path}: {what} is {size:,} bytes, more than the {max_bytes:,} a {what} may hold")
        data = path.read_bytes()
    except OSError as e:
        raise UsaeError(f"{path}: {what} could not be read ({e.strerror or e})") from None
    return decode_user_text(data, path, what)


def decode_user_text(data: bytes, path: Path, what: str) -> str:
    """``data`` decoded as :func:`read_user_text` decodes a file (one-line UsaeError naming ``path``)."""
    encoding, name, start = "utf-8", "UTF-8", 0
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            if codec is None:
                raise UsaeError(f"{path}: {what} is {label}; save it as UTF-8 (or UTF-16 with a byte-order mark)")
            encoding, name, start = codec, label, len(bom)
            break
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as e:
        at = start + e.start
        raise UsaeError(
            f"{path}: {what} is not {name} (byte 0x{data[at]:02x} at offset {at}); save it as UTF-8 "
            "(or UTF-16 with a byte-order mark)"
        ) from None


def read_user_csv(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every row of a CSV file read through :func:`read_user_text`.

    The field limit is raised to the size bound (csv's default, 128 KiB, made a long label a
    traceback); a row that does not parse (an unclosed or stray quote) is one line naming file:line.
    """
    text = read_user_text(path, what)
    csv.field_size_limit(max(csv.field_size_limit(), USER_TEXT_MAX_BYTES))
    # strict: an unclosed quote is an error, not a field that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, start = [], 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UsaeError(f"{path}:{start}: {what} row does not parse as CSV ({one_line(e)})") from None
    return rows


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file (through :func:`read_user_text`); a missing or malformed file is a one-line
    UsaeError naming it."""
    text = read_user_text(Path(path), what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit int, deep nesting
        raise UsaeError(f"{path}: {what} is not valid JSON ({e.__class__.__name__}: {str(e)[:200]})") from None


# -- JSON a user may edit, checked against a schema --------------------------------------------------
class Maybe:
    """A schema whose value may be null or, as a field of an object, absent."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema


NUMBER = (int, float)
"""A schema for any JSON number (not a bool)."""
NUMBER_OR_NULL = (int, float, type(None))
"""A number or null, as a field that must be present (a template reads it)."""
_NAMES = {str: "text", int: "an integer", bool: "true or false", dict: "an object", list: "an array"}


def check_schema(data: Any, schema: Any, path: Path, key: str = "") -> None:
    """One-line UsaeError naming ``path`` and the key (``families.dataset.concepts.3``) where ``data``
    does not fit ``schema``; a reader indexes what it checked without meeting a wrong type.

    ``schema``: a type (``str``, ``int``, ``bool``, ``dict``, ``list``; ``NUMBER`` any number), a
    :class:`Maybe`, ``[item]`` (an array of items), ``{str: value}`` (an object of any keys) or
    ``{"field": schema, ...}`` (an object with these fields, others free).
    """
    if isinstance(schema, Maybe):
        if data is not None:
            check_schema(data, schema.schema, path, key)
        return
    where = repr(key) if key else "the top level"
    if isinstance(schema, list):
        _want(isinstance(data, list), data, "an array", path, where)
        for i, item in enumerate(data):
            check_schema(item, schema[0], path, f"{key}[{i}]")
    elif isinstance(schema, dict):
        _want(isinstance(data, dict), data, "an object", path, where)
        if set(schema) == {str}:
            for k, v in data.items():
                check_schema(v, schema[str], path, f"{key}.{k}" if key else str(k))
            return
        for field, sub in schema.items():
            if field not in data and not isinstance(sub, Maybe):
                raise UsaeError(f"{path}: missing key {(f'{key}.{field}' if key else field)!r}")
            check_schema(data.get(field), sub, path, f"{key}.{field}" if key else field)
    else:
        kinds = schema if isinstance(schema, tuple) else (schema,)
        ok = isinstance(data, kinds) and not (isinstance(data, bool) and bool not in kinds)
        names = {NUMBER: "a number", NUMBER_OR_NULL: "a number or null"}
        _want(ok, data, names.get(kinds) or _NAMES.get(kinds[0], kinds[0].__name__), path, where)


_JSON_TYPES = {dict: "an object", list: "an array", str: "text", bool: "a boolean", type(None): "null"}


def _want(ok: bool, data: Any, what: str, path: Path, where: str) -> None:
    if not ok:
        got = repr(data)[:40] if isinstance(data, int | float) and not isinstance(data, bool) else None
        got = got or (repr(data[:40]) if isinstance(data, str) else _JSON_TYPES.get(type(data), type(data).__name__))
        raise UsaeError(f"{path}: {where} must be {what}, got {got}")
