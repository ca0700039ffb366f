"""`nlvid` (the executable) makes glibc keep freed memory for reuse (nlvid.engine.device.reuse_freed_memory).

Each check runs in a subprocess: the setting is process-wide, and the test process must keep glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting applies to glibc only")

# Allocates, fills and frees a 64 MiB tensor twelve times, as a training loop does with its activations, and counts
# the page faults of the last four cycles: with glibc's defaults the block is unmapped on every free and all its
# 4 KiB pages fault again (4 x 16384); reused, none once the heap has settled (measured: after 2 to 4 cycles, as
# where the freed blocks land varies from run to run).
_FAULTS = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_cycle = []
for _ in range(12):
    before = faults()
    x = torch.ones(16 * 2**20)
    per_cycle.append(faults() - before)
    del x
print("faults", sum(per_cycle[8:]))
"""


def _run(prelude: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    code = textwrap.dedent(prelude) + _FAULTS
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "NLVID_MALLOC"}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True)
    lines = out.stdout.split()
    return " ".join(lines[:-2]), int(lines[-1])


def test_freed_memory_is_reused_without_page_faults():
    _, default_faults = _run("")
    state, reuse_faults = _run("from nlvid.engine.device import reuse_freed_memory; print(reuse_freed_memory())")
    assert state == "True"
    assert default_faults > 60_000  # 4 x 16384 pages of 4 KiB, faulted in again
    assert reuse_faults < default_faults / 10


def test_the_executable_sets_it_and_importing_nlvid_does_not():
    state, faults = _run("""
        import sys
        from nlvid.cli import main
        sys.argv = ["nlvid", "--version"]
        try:
            main()
        except SystemExit:
            pass
    """)
    assert faults < 3_000
    _, faults = _run("""
        from nlvid.cli import main
        try:
            main(["--version"])
        except SystemExit:
            pass
    """)
    assert faults > 60_000  # main(argv) is a caller in its own process: glibc's defaults stay


@pytest.mark.parametrize("env", [{"NLVID_MALLOC": "system"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_a_users_own_malloc_choice_is_left_alone(env):
    state, faults = _run("from nlvid.engine.device import reuse_freed_memory; print(reuse_freed_memory())", env)
    assert state == "False"
    assert faults > 60_000
