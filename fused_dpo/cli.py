"""Command line: `fused-dpo check`, `fused-dpo train ...`, `fused-dpo plan ...`, `fused-dpo bench ...`."""

from __future__ import annotations

import sys
from pathlib import Path


def _bench_main():
    """bench/ is a folder of the checkout, not part of the installed package. The console script
    starts with its own bin/ folder on sys.path, so look for the checkout beside the package (an
    editable install) and in the current directory."""
    try:
        from bench.__main__ import main
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.__main__"):
            raise
    else:
        return main
    import fused_dpo

    for root in (Path(fused_dpo.__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / "__main__.py").is_file():
            sys.path.insert(0, str(root))
            from bench.__main__ import main

            return main
    return None


def version() -> str:
    """`fused-dpo --version`: this package's version, and torch's (what a bug report needs)."""
    import torch

    from . import __version__

    return f"fused-dpo {__version__} (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: fused-dpo {train,plan,check,bench} [options]   (fused-dpo COMMAND --help; "
             "fused-dpo --version)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        from .check import main as check

        return check(rest)
    if cmd == "train":
        from .train.cli import main as train

        return train(rest)
    if cmd == "plan":
        from .train.plan import main as plan

        return plan(rest)
    if cmd == "bench":
        bench = _bench_main()
        if bench is None:
            print("error: the benchmarks live in the repository's bench/ folder, which is not beside "
                  "this installation nor in the current directory: run `python -m bench` from a "
                  "checkout", file=sys.stderr)
            return 2
        return bench(rest)
    print(f"error: unknown command {cmd!r}; {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
