"""The release path, end to end: scripts/check-wheel.

It builds the sdist and, from it, the wheel; repairs the wheel to the lowest
manylinux tag auditwheel allows; installs it in a fresh venv without Cython;
checks that fastpop imports from there with the compiled parser and that
``fastpop serve --demo`` serves a message to poplib; then runs this test
suite against the installed package, from outside the source tree (without
this test: it never recurses).  A few minutes, and it needs PyPI (build
isolation, the venv's dependencies).
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check-wheel"
WHEEL_CHECK_TIMEOUT = 1500

pytestmark = [
    pytest.mark.wheel,
    pytest.mark.timeout(1560),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="manylinux wheels are built on Linux"),
    # The suite also runs against installed wheels, where there is no source tree to build.
    pytest.mark.skipif(not (ROOT / "setup.py").exists() or not SCRIPT.exists(), reason="needs the source tree"),
    pytest.mark.skipif(bool(os.environ.get("FASTPOP_WHEEL_CHECK")), reason="already inside a wheel check"),
]


def test_wheel_builds_from_sdist_installs_without_compiler_and_passes_the_suite():
    # Its own process group, so that on a timeout the inner pytest and servers go too.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        # the build takes ~40 s and the installed package's suite most of the rest: ~14 minutes
        # on the 2-core CI machine in December 2026; this bound leaves it room to grow
        out, _ = proc.communicate(timeout=WHEEL_CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"scripts/check-wheel took over {WHEEL_CHECK_TIMEOUT} s:\n{out[-30000:]}")
    assert proc.returncode == 0, f"scripts/check-wheel failed (exit {proc.returncode}):\n{out[-30000:]}"
    tag = re.search(r"^check-wheel: auditwheel: (\S+) -> (\S+\.whl)$", out, re.M)
    assert tag, out
    libc = platform.libc_ver()[0]
    expected = "manylinux" if libc == "glibc" else "musllinux"
    assert tag.group(1).startswith(expected + "_") and tag.group(1).endswith("_" + platform.machine()), tag.group(0)
    assert tag.group(1) in tag.group(2)
    assert re.search(r"^check-wheel: OK: .*/venv/lib/.*/site-packages/fastpop/__init__\.py \(parser: cython;", out,
                     re.M), out
    assert re.search(r"^check-wheel: OK: fastpop-\S+\.whl", out, re.M), out
    print(out[out.find("check-wheel: times:"):])
