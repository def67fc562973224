#!/usr/bin/env python3
"""Run the atheris harnesses for a bounded time and summarise.

    python fuzz/run.py                       # both harnesses, 60 s each, in parallel
    python fuzz/run.py --seconds 3600 parser # one harness, an hour
    python fuzz/run.py --corpus fuzz/corpus  # keep the corpus between runs

Each harness starts from ``fuzz/seeds/<name>`` (and the kept corpus, if any)
with the dictionary ``fuzz/pop3.dict``.  An input that fails is written to
``--artifacts`` (default ``fuzz/crashes``) as ``crash-<sha1>``: replay it
with ``python fuzz/fuzz_<name>.py FILE``, then make it a regression test
(``tests/test_fuzz_harnesses.py`` replays every file of ``fuzz/regressions``).
Prints one line per harness (executions, seconds, coverage) and exits 1 if
any harness found a failure, 2 if one could not run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("parser", "stuffing")


def command(name: str, seconds: int, corpus: Path, artifacts: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(HERE / f"fuzz_{name}.py"),
        f"-max_total_time={seconds}", f"-dict={HERE / 'pop3.dict'}", "-max_len=4096",
        f"-artifact_prefix={artifacts}/", "-print_final_stats=1", *extra,
        str(corpus), str(HERE / "seeds" / name),
    ]


def summarise(name: str, rc: int, output: str) -> dict:
    runs = re.search(r"Done (\d+) runs in (\d+) second", output)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", output)
    crash = re.search(r"Test unit written to (\S+)", output)
    return {
        "name": name,
        "rc": rc,
        "runs": int(runs.group(1)) if runs else None,
        "seconds": int(runs.group(2)) if runs else None,
        "cov": cov[-1] if cov else None,
        "crash": crash.group(1) if crash else None,
        "output": output,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("harness", nargs="*", help=f"{' and/or '.join(HARNESSES)} (default: all)")
    ap.add_argument("--seconds", type=int, default=60, help="per harness (default 60)")
    ap.add_argument("--corpus", type=Path, help="corpus directory kept between runs (default: a temporary one)")
    ap.add_argument("--artifacts", type=Path, default=HERE / "crashes", help="where failing inputs go")
    ap.add_argument("--sequential", action="store_true", help="one harness after the other")
    ap.add_argument("--libfuzzer", action="append", default=[], metavar="FLAG", help="extra libFuzzer flag")
    args = ap.parse_args(argv)
    names = args.harness or list(HARNESSES)
    for name in names:
        if name not in HARNESSES:
            ap.error(f"unknown harness {name!r} (one of {', '.join(HARNESSES)})")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    args.artifacts.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fastpop-fuzz-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    procs = []
    try:
        for name in names:
            corpus = (args.corpus / name) if args.corpus else tmp / name
            corpus.mkdir(parents=True, exist_ok=True)
            cmd = command(name, args.seconds, corpus, args.artifacts, args.libfuzzer)
            log = open(tmp / f"{name}.log", "w+")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
            procs.append((name, p, log))
            if args.sequential:
                p.wait()
        results = []
        for name, p, log in procs:
            rc = p.wait(timeout=args.seconds + 120)
            log.seek(0)
            results.append(summarise(name, rc, log.read()))
            log.close()
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    status = 0
    for r in results:
        if r["rc"] == 0 and r["runs"] is not None:
            cov = f"cov {r['cov'][0]} ft {r['cov'][1]}" if r["cov"] else ""
            print(f"fuzz {r['name']}: {r['runs']} executions in {r['seconds']} s, no failure ({cov})")
            continue
        status = max(status, 1 if r["crash"] else 2)
        tail = "\n".join(r["output"].splitlines()[-40:])
        print(f"fuzz {r['name']}: FAILED (exit {r['rc']}), input: {r['crash']}\n{tail}")
    return status


if __name__ == "__main__":
    sys.exit(main())
