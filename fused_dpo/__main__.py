"""`python -m fused_dpo ...` is `fused-dpo ...`; under torchrun: `torchrun --nproc-per-node N -m
fused_dpo train --parallel ddp|fsdp2 ...`."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

# Under torchrun, an exception that ends a rank is written where torchrun's failure summary reads
# it, next to the rank that raised it; without torchrun, `record` changes nothing.
sys.exit(record(main)())
