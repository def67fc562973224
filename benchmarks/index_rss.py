"""A worker's memory after serving many distinct mailboxes: does it grow with
the indexes it has read?

    sudo python3 benchmarks/index_rss.py [--mailboxes 10000] [--messages 20] [--baseline TREE]

Seeds ``--mailboxes`` Maildirs of ``--messages`` messages each (hard links to a
few message files, each name with S= and W=; cur/ given an old mtime so the
index is trusted at once), then for each configuration starts one fastpop
process (``--workers 1``) on 127.0.0.1 and logs in to every mailbox once
(login, STAT, QUIT: the cold pass, which builds each index) and again (the
warm pass), reading the process's VmRSS, RssAnon and RssFile from /proc at
start (after one warm-up login) and after each pass.

Configurations (as root, with ``--allow-mail-as-root``):

- ``copy``: the Maildirs are root's, the server's own uid, so their indexes are
  read into the bounded per-process cache (fastpop.store.index);
- ``mapped``: the Maildirs belong to nobody; their indexes (root's, 0600) are
  memory-mapped while a session uses them;
- ``external``: ``[mail] index`` is a directory of the server's own (root's
  Maildirs); started through a launcher that calls
  ``fastpop.store.index.configure`` before the server's own main;
- ``baseline`` (with ``--baseline TREE``): the fastpop in that source tree
  (extensions built; e.g. ``git archive`` of an older commit), on the ``copy``
  Maildirs.

Everything lives in a temporary directory removed at the end; each pass is
bounded by ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

LAUNCHER = """
import sys
from fastpop.store import index
index.configure(sys.argv[1])
from fastpop.cli import main
sys.exit(main(sys.argv[2:]))
"""


def seed(root: str, mailboxes: int, messages: int, owner: tuple[int, int] | None) -> str:
    """root/mail/user<i>/{cur,new,tmp}, ``messages`` hard links in each cur/; returns the passwd-file."""
    mail = os.path.join(root, "mail")
    pool_dir = os.path.join(root, "pool")
    os.makedirs(mail)
    os.makedirs(pool_dir)
    pool = []
    for j in range(8):  # a few distinct messages, linked into every Maildir
        data = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: message %d\r\n\r\n" % j
                + b"A line of an ordinary body, about as long as one is.\r\n" * (20 + j))
        path = os.path.join(pool_dir, f"m{j}")
        with open(path, "wb") as f:
            f.write(data)
        if owner:
            os.chown(path, *owner)
        pool.append((path, len(data)))
    old = time.time() - 3600
    passwd = os.path.join(root, "passwd")
    with open(passwd, "w") as pw:
        for i in range(mailboxes):
            md = os.path.join(mail, f"user{i}")
            for sub in ("", "cur", "new", "tmp"):
                os.mkdir(os.path.join(md, sub), 0o700)
                if owner:
                    os.chown(os.path.join(md, sub), *owner)
            cur = os.path.join(md, "cur")
            for k in range(messages):
                path, size = pool[k % len(pool)]
                os.link(path, os.path.join(cur, f"{1700000000 + k}.M{k}P{i}.bench,S={size},W={size}:2,"))
            os.utime(cur, (old, old))
            pw.write(f"user{i}:{{PLAIN}}pw{i}" + (f":{owner[0]}:{owner[1]}" if owner else "") + "\n")
    os.chmod(root, 0o755)
    return passwd


def start(root: str, passwd: str, label: str, prefix: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """One fastpop process; run in the baseline tree (-m puts the cwd first on sys.path), else in ``root``."""
    log = open(os.path.join(root, f"{label}.log"), "w+")
    args = [*prefix, "serve", "--listen", "127.0.0.1:0", "--workers", "1", "--passwd-file", passwd,
            "--mail-location", os.path.join(root, "mail", "%u"), "--log-level", "info",
            "--auth-failure-delay", "0", "--allow-mail-as-root"]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=env.get("PYTHONPATH") or root)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log.seek(0)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read())
        if m:
            tree = env.get("PYTHONPATH")
            if tree:  # that it runs the fastpop of that tree: its compiled modules are mapped from there
                with open(f"/proc/{proc.pid}/maps") as f:
                    if not any(tree + "/fastpop/" in line for line in f):
                        proc.kill()
                        raise RuntimeError(f"{label}: the server does not run the fastpop in {tree}")
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    log.seek(0)
    proc.kill()
    raise RuntimeError(f"{label}: fastpop did not start:\n{log.read()}")


def login_stat(port: int, i: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"USER user%d\r\nPASS pw%d\r\nSTAT\r\nQUIT\r\n" % (i, i))
        data = b""
        while data.count(b"\r\n") < 5:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    replies = data.split(b"\r\n")
    if len(replies) < 5 or not all(r.startswith(b"+OK") for r in replies[:5]):
        raise RuntimeError(f"user{i}: {data!r}")


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out


def run(label: str, root: str, passwd: str, mailboxes: int, prefix: list[str], env: dict[str, str],
        timeout: float) -> list[tuple[str, dict[str, int], float]]:
    proc, port = start(root, passwd, label, prefix, env)
    try:
        login_stat(port, 0)  # warm-up: the server's own imports and buffers
        rows = [("start", memory(proc.pid), 0.0)]
        for phase in ("cold pass", "warm pass"):
            t0 = time.perf_counter()
            for i in range(mailboxes):
                login_stat(port, i)
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{label}: {phase} took over {timeout} s")
            rows.append((phase, memory(proc.pid), time.perf_counter() - t0))
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mailboxes", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--baseline", metavar="TREE", help="also run the fastpop in this source tree (copy Maildirs)")
    ap.add_argument("--config", action="append", choices=["copy", "mapped", "external"],
                    help="the configurations to run (default: all)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a pass may take before the run stops")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("index_rss.py needs root: Maildirs of another uid, served as root")
    configs = args.config or ["copy", "mapped", "external"]
    nobody = pwd.getpwnam("nobody")
    top = tempfile.mkdtemp(prefix="fastpop-rss-")
    results = {}
    try:
        trees = {}
        t0 = time.perf_counter()
        if {"copy", "external"} & set(configs) or args.baseline:
            trees["root"] = os.path.join(top, "root")
            os.mkdir(trees["root"])
            seed(trees["root"], args.mailboxes, args.messages, None)
        if "mapped" in configs:
            trees["nobody"] = os.path.join(top, "nobody")
            os.mkdir(trees["nobody"])
            seed(trees["nobody"], args.mailboxes, args.messages, (nobody.pw_uid, nobody.pw_gid))
        print(f"seeded {args.mailboxes} mailboxes x {args.messages} messages per tree "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        python = [sys.executable, "-m", "fastpop"]
        plan = []
        if args.baseline:
            plan.append(("baseline", "root", python, dict(env, PYTHONPATH=os.path.abspath(args.baseline))))
        for config in configs:
            if config == "external":
                index_dir = os.path.join(top, "index")
                plan.append((config, "root", [sys.executable, "-c", LAUNCHER, index_dir], env))
            else:
                plan.append((config, "nobody" if config == "mapped" else "root", python, env))
        for label, tree, prefix, run_env in plan:
            root = trees[tree]
            for md in os.listdir(os.path.join(root, "mail")):  # a fresh start: no index from an earlier run
                index = os.path.join(root, "mail", md, "fastpop.index")
                if os.path.exists(index):
                    os.unlink(index)
            results[label] = run(label, root, os.path.join(root, "passwd"), args.mailboxes, prefix, run_env,
                                 args.timeout)
            print(f"{label}: done", file=sys.stderr)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"\nWorker memory (KiB) after login+STAT of {args.mailboxes} distinct mailboxes of "
          f"{args.messages} messages, one process")
    print(f"{'configuration':<14}{'phase':<11}{'VmRSS':>9}{'RssAnon':>9}{'RssFile':>9}"
          f"{'RSS growth':>12}{'pass s':>8}")
    for label, rows in results.items():
        start_rss = rows[0][1]["VmRSS"]
        for phase, mem, seconds in rows:
            print(f"{label:<14}{phase:<11}{mem['VmRSS']:>9}{mem['RssAnon']:>9}{mem['RssFile']:>9}"
                  f"{mem['VmRSS'] - start_rss:>12}{seconds:>8.1f}")


if __name__ == "__main__":
    main()
