"""CPU time and memory of a server's whole process tree, from /proc.

Dovecot is a master and many children, fastpop one process: to compare them
fairly every figure is summed over the tree rooted at the given PID.  CPU
counts ``utime + stime + cutime + cstime`` of each live process, so a child
that exits and is reaped during the run still counts (in its parent's
``c*time``) and the difference of two samples is what the tree used between
them.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ")"
    return data[data.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # fields[0] is state (field 3); utime..cstime are fields 14-17
            total += sum(int(x) for x in fields[11:15])
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages divided among their sharers."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            pass
    return total


class ServerMonitor:
    """Samples a server's process tree: CPU between marks, peak RSS."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        if not os.path.exists(f"/proc/{pid}"):
            raise ValueError(f"no process {pid}")
        self.peak_rss = 0
        self.processes = 0
        self.marks: dict[str, float] = {}

    def pids(self) -> list[int]:
        pids = tree(self.pid)
        self.processes = max(self.processes, len(pids))
        return pids

    def mark(self, name: str) -> float:
        value = self.marks[name] = cpu_seconds(self.pids())
        return value

    def sample_rss(self) -> int:
        rss = rss_bytes(self.pids())
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def memory(self) -> tuple[int, int]:
        pids = self.pids()
        rss = rss_bytes(pids)
        self.peak_rss = max(self.peak_rss, rss)
        return rss, pss_bytes(pids)
