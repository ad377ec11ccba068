"""Names and paths that come from users: one rule for dataset names, one helper for every path built
from a name, a label or a file name.

Anything a user types or a dataset holds (a dataset name, a class label, a manifest's path, a file
name found on disk) can hold `..`, an absolute path, a NUL, a newline or bytes that are not UTF-8.
`check_dataset_name` is the dataset-name rule, applied once where a dataset is registered.
`safe_join` is the only way a path is built from such text: it refuses what cannot be a file name,
then resolves the result (following symlinks) and checks that it lies strictly below its parent.
`shown` turns any such text into one printable line, with undecodable bytes escaped.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

NAME_RULE = ("letters a-z A-Z, digits, '-', '_' or '.', not starting with a dot, "
             "1 to 64 characters")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MAX_NAME_BYTES = 255      # longest file name (one path component) on common file systems
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


class UnsafePathError(ValueError):
    """A name or path that would leave its parent folder, or cannot be a file name at all."""


# -- dataset names -----------------------------------------------------------------------------
def check_dataset_name(name: str) -> str:
    """The dataset-name rule (`NAME_RULE`). Returns the name; raises `DatasetError` with the rule."""
    from core.data.catalog import DatasetError  # here: this module imports nothing of redex's at load

    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DatasetError(f"invalid dataset name {shown(name)!r}: use {NAME_RULE}")
    return name


def default_dataset_name(stem: str) -> str:
    """A valid dataset name made from a file or folder name (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:64]
    return name or "dataset"


# -- paths -------------------------------------------------------------------------------------
def safe_join(parent: str | Path, *parts: str, subdirs: bool = False, what: str = "name") -> Path:
    """`parent / parts[0] / parts[1] ...`, refused unless it stays strictly below `parent`.

    Each part is one file or folder name, or with `subdirs=True` a relative path (`a/b.png`).
    Refused (`UnsafePathError`, saying `what` was wrong): empty parts, `.` and `..`, absolute paths,
    NUL, newlines, names over 255 bytes or not encodable; then the joined path is resolved (symlinks
    followed) and compared with the resolved parent, so a symlink out of `parent` is refused too.
    Returns the joined path as built (not resolved).
    """
    parent = Path(parent)
    path = parent
    for part in parts:
        for name in _components(part, subdirs, what):
            path = path / name
    base = parent.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UnsafePathError(f"{what} {shown(_joined(parts))!r}: cannot be resolved ({exc})") from None
    if base not in resolved.parents:
        raise UnsafePathError(f"{what} {shown(_joined(parts))!r} leads outside {shown(str(parent))}")
    return path


def is_under(path: str | Path, parent: str | Path) -> bool:
    """Does `path` (resolved) lie strictly below `parent` (resolved)?"""
    return Path(parent).resolve() in Path(path).resolve().parents


def special_kind(mode: int) -> str | None:
    """What a file that is not a regular file is (from `os.stat(...).st_mode`), or None if it is one."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """`os.stat(path)` of a regular file; `UnsafePathError` for a missing one, a folder, a device, a FIFO
    or a socket, before anything opens it (opening a FIFO blocks; /dev/zero never ends). For files
    a user names: checkpoints, manifests."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafePathError(f"no such {what}: {shown(path)}") from None
    except (OSError, ValueError) as exc:
        raise UnsafePathError(f"{what} {shown(path)}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    kind = special_kind(st.st_mode)
    if kind:
        raise UnsafePathError(f"{what} {shown(path)} is {kind}, not a regular file")
    return st


def file_digest(path: str | Path, what: str = "file") -> str:
    """A short hash (12 hex digits) of a file's bytes, for ids of models loaded from a user's file.
    `regular_file` first, so a FIFO or a device is refused instead of read."""
    regular_file(path, what)
    h = hashlib.blake2b(digest_size=6)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def id_file_name(ident: str, suffix: str = "") -> str:
    """A file name for an id of any length and characters (a backbone or model id), for use with
    `safe_join`: characters other than letters, digits and `-_.` become `_` (so existing file names
    stay the same), and a name too long for the file system is cut and ends with a hash of the id."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", ident).lstrip(".") or "_"
    if len(name) + len(suffix) > 200:
        name = name[:160] + "-" + hashlib.blake2b(ident.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return name + suffix


def shown(text) -> str:
    """`text` as one printable line: bytes that are not UTF-8 (surrogate escapes) shown as `\\xe9`."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    text = str(text)
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    out = raw.decode("utf-8", "backslashreplace")
    return out.replace("\n", "\\n").replace("\r", "\\r").replace("\x00", "\\x00")


def utf8_problem(text: str) -> str | None:
    """Why `text` (a name read from disk) cannot be stored as UTF-8, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (shown with its bytes escaped); rename it to include it"
    return None


def _components(part: str, subdirs: bool, what: str) -> list[str]:
    if not isinstance(part, str):
        raise UnsafePathError(f"{what} {part!r}: not a string")
    label = f"{what} {shown(part)!r}"
    if not part:
        raise UnsafePathError(f"{what} is empty")
    if "\x00" in part:
        raise UnsafePathError(f"{label}: contains a NUL byte")
    if "\n" in part or "\r" in part:
        raise UnsafePathError(f"{label}: contains a line break")
    if part.startswith("/"):
        raise UnsafePathError(f"{label}: an absolute path is not allowed")
    names = part.split("/")
    if not subdirs and len(names) > 1:
        raise UnsafePathError(f"{label}: '/' is not allowed in a {what}")
    names = [n for n in names if n] if subdirs else names
    if not names:
        raise UnsafePathError(f"{what} is empty")
    for name in names:
        if name in (".", ".."):
            raise UnsafePathError(f"{label}: {name!r} is not allowed")
        try:
            size = len(os.fsencode(name))
        except UnicodeEncodeError:
            raise UnsafePathError(f"{label}: cannot be encoded as a file name") from None
        if size > MAX_NAME_BYTES:
            raise UnsafePathError(f"{what} {shown(part)[:40]!r}...: {size} bytes, over the "
                                  f"{MAX_NAME_BYTES}-byte limit of a file name")
    return names


def _joined(parts) -> str:
    return "/".join(str(p) for p in parts)
