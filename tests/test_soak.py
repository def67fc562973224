"""A short soak: ``benchmarks/soak.py`` for ``FASTPOP_SOAK_SECONDS`` (default 25).

Mixed POP3 load from ``fastpop bench`` (downloads checked against their
checksums, download-deletes), LMTP deliveries at the same time, then the
audit: delivered minus deleted equals present, every file byte-identical to
a message stored in that mailbox, no protocol error, no refused delivery,
no warning in the server's log, no RSS growth after warm-up.  Longer:
``python benchmarks/soak.py --seconds 3600``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("FASTPOP_SOAK_SECONDS", "25"))

pytest.importorskip("hdrh", reason="fastpop bench needs hdrhistogram (the fastpop[bench] extra)")


@pytest.mark.timeout(SECONDS + 180)
def test_soak(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", str(SECONDS),
                        "--mailboxes", "40", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=SECONDS + 150)
    print(r.stdout)
    assert out.exists(), r.stdout + r.stderr
    summary = json.loads(out.read_text())
    assert r.returncode == 0 and summary["ok"], summary["failures"] or r.stderr
    assert summary["lost"] == 0 and summary["not_byte_identical"] == 0 and summary["bench_errors"] == 0
    assert summary["delivered"] > 50 and summary["deleted"] > 50 and summary["bench_messages"] > 500, summary
