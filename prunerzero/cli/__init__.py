"""Command line: ``prunerzero prune | gradients | eval | search | export | heldout | rescore | allocate | report | finetune``.

One module per command, each with a ``register(subparsers)`` function; they parse arguments and
call the library, and nothing in the library imports them. Every problem with the user's input is
a :class:`~prunerzero.errors.UserError`, printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from prunerzero.cli import eval as eval_command
from prunerzero.cli import finetune, gradients, prune, report, search
from prunerzero.errors import UserError

COMMANDS = (prune, gradients, eval_command, search, report, finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunerzero", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except UserError as e:
        print(f"prunerzero: error: {e}", file=sys.stderr)
        return e.status
    except OSError as e:  # a file read or written without going through prunerzero.files: still one line
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where = f" ({e.filename})" if e.filename else ""
        print(f"prunerzero: error: {e.strerror or e}{where}; "
              + ("free some space and run the command again" if full else "check the path and its permissions"),
              file=sys.stderr)
        return 1 if full else 2
    except KeyboardInterrupt:
        print("prunerzero: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
