"""`python -m fused_dpo ...` is `fused-dpo ...`; under torchrun: `torchrun --nproc-per-node N -m
fused_dpo train --parallel ddp|fsdp2 ...`."""

import sys

from .cli import main

sys.exit(main())
