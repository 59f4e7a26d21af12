"""`nanoseek <verb>`: one entry point for every part of the system.

Each verb parses its flags here and calls one function of its subsystem, so `nanoseek --help` shows the
whole surface in one file. Errors a user can fix (bad config, missing file) end with one line, no traceback.
"""
from __future__ import annotations

import argparse
import sys


# ---- info --------------------------------------------------------------------------------------------
def _add_info(sub):
    p = sub.add_parser("info", help="parameter counts and cache sizes of a config")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="tiny | small | v2-lite | v3")
    g.add_argument("--config", default=None, help="path to an HF config.json (or its directory)")
    p.add_argument("--forward", action="store_true", help="also run a forward pass of a random model")

    def run(a):
        from .info import main
        main(preset=a.preset, config=a.config, forward=a.forward)
    p.set_defaults(func=run)


COMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"nanoseek {args.verb}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
