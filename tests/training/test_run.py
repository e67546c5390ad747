import subprocess
import sys

import pytest

from graft.training.run import glibc

# A training-step-shaped loop: (512, 1536) activations allocated and freed again and again.
_FAULTS = """
import resource, sys, torch
from graft.training.run import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
else:  # glibc's default thresholds, held fixed: left dynamic they settle differently from run to run
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 128 * 1024) and libc.mallopt(-1, 128 * 1024)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
x, w = torch.randn(512, 576), torch.randn(1536, 576)
def step():
    h = x @ w.T
    return (torch.nn.functional.silu(h * 2.0) * h @ w).sum()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(glibc() is None, reason="no glibc here")
def test_keeping_freed_memory_stops_the_page_faults_of_a_step():
    # The loop allocates ~13 MB per step, ~320k pages over 100 steps. glibc's default thresholds hand those
    # pages back and fault them in again on every step; kept, they are reused
    default, kept = _page_faults("off"), _page_faults("on")
    assert kept < 10_000 and kept * 10 < default, (kept, default)
