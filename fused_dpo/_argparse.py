"""The argument parser every `fused-dpo` command uses (its own module: the top-level CLI imports
the commands, and the commands import this, with no circle)."""

from __future__ import annotations

import argparse
import difflib


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting: every command's
    errors end as one `error: ...` line on stderr with exit code 2. No prefix matching
    (allow_abbrev=False): with it, `--lr 1e-3` was taken as --lr-scheduler and `--max-step 3` as
    --max-steps; an unknown flag is an error that names the flags it resembles."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            given = [t.split("=")[0] for t in message.split(":", 1)[1].split() if t.startswith("--")]
            near = [m for t in given for m in difflib.get_close_matches(t, known, n=2, cutoff=0.85)]
            if near:
                hint = f"; did you mean {' or '.join(dict.fromkeys(near))}?"
        raise ValueError(f"{message}{hint} ({self.prog} --help lists the options)")
