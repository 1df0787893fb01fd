"""`python3 .ci/measure.py LABEL CMD...`: run CMD, then print its wall time, CPU time and peak RSS
on one line and exit with CMD's status.

The peak RSS is getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest single process among CMD and all
its descendants that were waited for (pytest, and what it starts: torchrun and its ranks, the
ptxas compile subprocesses), not the sum of processes alive at the same time. It is the number
`/usr/bin/time -v` reports as "Maximum resident set size", without depending on GNU time.
"""

import resource
import subprocess
import sys
import time

label, cmd = sys.argv[1], sys.argv[2:]
start = time.monotonic()
rc = subprocess.call(cmd)
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = usage.ru_utime + usage.ru_stime  # beside the wall time: less swayed by other jobs on the machine
print(f"{label}: exit {rc}, wall {int(wall // 60)}m{int(wall % 60):02d}s, cpu {cpu:.0f} s, "
      f"peak RSS {usage.ru_maxrss / 2**20:.2f} GiB (largest single process)", flush=True)
sys.exit(rc)
