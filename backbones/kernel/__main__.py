"""``python -m backbones.kernel build|status``: compile the fused CPU scan kernel, or say which one runs."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from backbones.kernel import build, find_compiler, isa_levels, status


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backbones.kernel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="compile the kernel for this machine's ISA levels")
    build_cmd.add_argument("--isa", action="append", choices=list(isa_levels()),
                           help="build only this level and the baseline (repeatable); default: all")
    build_cmd.add_argument("--skip-without-compiler", action="store_true",
                           help="exit successfully (with a note) when no C++ compiler is installed")
    sub.add_parser("status", help="say which kernel this process would use, and why")
    args = parser.parse_args(argv)
    if args.command == "status":
        current = status()
        print(("usable: " if current.library else "not usable: ") + current.reason)
        return 0 if current.library else 1
    if find_compiler() is None and args.skip_without_compiler:
        print("no C++ compiler found: the fused scan kernel is not built; the pure-PyTorch scan will be used")
        return 0
    try:
        build(args.isa)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 2
    print(status().reason if status().library else f"built, but not usable here: {status().reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
