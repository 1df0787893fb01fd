"""Command line: `fused-dpo check`, `fused-dpo train ...`, `fused-dpo bench ...`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: fused-dpo {train,check,bench} [options]   (fused-dpo COMMAND --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        from .check import main as check

        return check()
    if cmd == "train":
        from .train.cli import main as train

        return train(rest)
    if cmd == "bench":
        try:
            from bench.__main__ import main as bench
        except ImportError:
            print("the benchmarks live in the repository's bench/ folder: run `python -m bench` "
                  "from a checkout", file=sys.stderr)
            return 2
        return bench(rest)
    print(f"unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
