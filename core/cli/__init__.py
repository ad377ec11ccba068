"""`redex`: the command line. Calls the same core functions as the pages.

Long work runs as a background job (the same as from the app); the CLI follows it with a
progress bar. Ctrl-C stops following, not the job: it keeps running (`redex jobs`,
`redex cancel ID`). `--detach` returns at once.

One module per command group adds its subcommands (`add_parsers`) and holds their `cmd_*`
functions; `common` holds what they share. Heavy modules are imported inside the commands.
"""
from __future__ import annotations

import argparse
import sys

from core.cli import datasets, embed, groups, jobs, ltrp, training
from core.cli.common import CliError
from core.data import catalog

GROUPS = (datasets, embed, groups, training, ltrp, jobs)  # in the order `redex --help` lists them


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (CliError, catalog.DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"redex: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nredex: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redex", description="redex, the redundancy explorer")
    sub = p.add_subparsers(title="commands")
    for group in GROUPS:
        group.add_parsers(sub)
    return p
