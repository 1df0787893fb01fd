"""The torch this package needs, checked at import (before any torch.library op is defined).

pyproject.toml's `torch>=` says the same; tests/test_compat.py checks they agree. Older torch would
fail later with an obscure torch.library error: torch 2.4's schema inference rejects the string
annotations of `from __future__ import annotations`."""

import torch

MIN_TORCH = (2, 6)

_found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if _found < MIN_TORCH:
    raise ImportError(f"fused_dpo needs torch >= {'.'.join(map(str, MIN_TORCH))}; this is torch "
                      f"{torch.__version__}")
