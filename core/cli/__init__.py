"""`redex`: the command line. Calls the same core functions as the pages.

Long work runs as a background job (the same as from the app); the CLI follows it with a
progress bar. Ctrl-C stops following, not the job: it keeps running (`redex jobs`,
`redex cancel ID`). `--detach` returns at once.

One module per command group adds its subcommands (`add_parsers`) and holds their `cmd_*`
functions; `common` holds what they share. Heavy modules are imported inside the commands.

`main` is the one error boundary: an expected error (a bad name, path, file or value, a damaged
store, missing weights) is one line `redex: error: ...` and exit code 1; anything else is one line
naming the exception and the file under `<cache>/logs/` that holds its traceback, and exit code 1.
A closed pipe (`redex jobs | head -1`) ends quietly.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from core.cli import datasets, doctor, embed, groups, jobs, ltrp, training
from core.cli.common import CliError
from core.store.db import StoreCorrupt, StoreLockTimeout

GROUPS = (datasets, embed, groups, training, ltrp, jobs, doctor)  # in the order `redex --help` lists them
EXPECTED = (CliError, ValueError, OSError, StoreCorrupt, StoreLockTimeout)  # ValueError: DatasetError,
# UnsafePathError, ExportError, MAEHasNoDecoder, bad settings; OSError: FileNotFoundError, PermissionError...
LAZY_EXPECTED = (("core.embed.timm_models", "BackboneUnavailable"),)  # only if its module was ever imported


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, inside the boundary
        return code
    except BrokenPipeError:
        _stdout_to_devnull()
        return 1
    except KeyboardInterrupt:
        print("\nredex: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes one line
        if isinstance(exc, _expected()):
            _error(_one_line(exc))
        else:
            log = _write_traceback(exc)
            _error(f"{type(exc).__name__}: {_one_line(exc)} (full traceback in {log})")
        return 1


def _expected() -> tuple[type, ...]:
    lazy = tuple(getattr(sys.modules[m], name) for m, name in LAZY_EXPECTED if m in sys.modules)
    return EXPECTED + lazy


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"  # not "[Errno 21] Is a directory: 'x'"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _error(line: str) -> None:
    try:
        print(f"redex: error: {line}", file=sys.stderr)
    except OSError:
        pass  # stderr itself is gone


def _write_traceback(exc: BaseException) -> Path:
    """The full traceback in `<cache>/logs/cli-<time>-<pid>.log` (else the temp folder); returns the file."""
    name = f"cli-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"redex {' '.join(sys.argv[1:])}\n" + "".join(traceback.format_exception(exc))
    try:
        from core import config

        folder = config.cache_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
    except Exception:  # noqa: BLE001 - the cache itself may be what is broken
        import tempfile

        folder = Path(tempfile.gettempdir())
    path = folder / name
    try:
        path.write_text(text)
    except OSError:
        return Path("(not written: " + str(path) + ")")
    return path


def _stdout_to_devnull() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's last flush cannot fail
    (what CPython's documentation of SIGPIPE recommends)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redex", description="redex, the redundancy explorer")
    sub = p.add_subparsers(title="commands")
    for group in GROUPS:
        group.add_parsers(sub)
    return p
