"""Turning a run into numbers people read: the result document, the
terminal summary (rich, or plain text: fastpop.bench.text), ``--json``, ``--plot`` and ``compare``.

Latencies are HdrHistograms in microseconds (1 us to 1 h, 3 significant
digits), merged over the client processes; each is kept in the JSON in
HdrHistogram's compressed base64 form, so two runs can be compared on the
full distribution later, not only on the percentiles printed here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

from fastpop import __version__
from fastpop.bench.client import LABELS

SCHEMA = "fastpop-bench/1"
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_LAT = {
    "type": "object",
    "required": ["count", "avg", "p50", "p90", "p99", "p99.9", "max", "hdr"],
    "properties": {"count": _INT, "avg": _NUM, "p50": _INT, "p90": _INT, "p99": _INT, "p99.9": _INT,
                   "max": _INT, "hdr": _STR},
}
# JSON Schema (draft 2020-12) of what --json writes.
RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fastpop bench result",
    "type": "object",
    "required": ["schema", "version", "started_at", "ok", "target", "scenario", "load", "window_seconds",
                 "totals", "rates", "latency_us", "errors", "client", "server", "timeline"],
    "properties": {
        "schema": {"const": SCHEMA},
        "version": _STR,
        "started_at": _STR,
        "ok": {"type": "boolean"},
        "target": {"type": "object", "required": ["address", "server", "spawned", "tls", "auth"],
                   "properties": {"address": _STR, "server": _STR, "spawned": {"type": "boolean"},
                                  "tls": {"enum": ["none", "starttls", "implicit"]},
                                  "auth": {"enum": ["user", "plain"]}}},
        "scenario": {"enum": ["login", "stat", "download", "download-delete", "retr-large", "idle", "mixed"]},
        "mix": {"type": ["object", "null"]},
        "mailboxes": {"type": ["object", "null"]},
        "load": {"type": "object",
                 "required": ["model", "connections", "rate", "duration", "sessions", "warmup", "procs", "loop",
                              "timeout"],
                 "properties": {"model": {"enum": ["closed", "open", "idle"]}, "connections": _INT,
                                "rate": {"type": ["number", "null"]}, "duration": {"type": ["number", "null"]},
                                "sessions": {"type": ["integer", "null"]}, "warmup": _NUM, "procs": _INT,
                                "loop": _STR, "timeout": _NUM}},
        "window_seconds": _NUM,
        "totals": {"type": "object",
                   "required": ["sessions", "failed_sessions", "started", "commands", "messages", "octets",
                                "drained", "backlog", "unverified"],
                   "additionalProperties": _INT},
        "rates": {"type": "object",
                  "required": ["sessions_per_s", "started_per_s", "commands_per_s", "messages_per_s", "mb_per_s"],
                  "additionalProperties": _NUM},
        "latency_us": {"type": "object", "additionalProperties": _LAT},
        "errors": {"type": "object", "required": ["total", "by_kind", "samples"],
                   "properties": {"total": _INT, "by_kind": {"type": "object", "additionalProperties": _INT},
                                  "samples": {"type": "object"}}},
        "client": {"type": "object", "required": ["cpu_seconds", "cpu_us_per_session", "utilisation"],
                   "properties": {"cpu_seconds": _NUM, "cpu_us_per_session": {"type": ["number", "null"]},
                                  "utilisation": _NUM}},
        "server": {"type": ["object", "null"],
                   "properties": {"pid": _INT, "cpu_seconds": _NUM,
                                  "cpu_s_per_1000_sessions": {"type": ["number", "null"]},
                                  "peak_rss_bytes": _INT, "processes": _INT}},
        "machine": {"type": "object", "properties": {"cpus": _INT, "usable_cpus": _INT,
                                                     "loadavg_before": {"type": "array"},
                                                     "loadavg_after": {"type": "array"}}},
        "timeline": {"type": "array",
                     "items": {"type": "object", "required": ["second", "sessions", "commands", "errors"]}},
    },
}


def validate(instance: Any, schema: dict = RESULT_SCHEMA, path: str = "$") -> list[str]:
    """The subset of JSON Schema used above (type, enum, const, required,
    properties, additionalProperties, items); returns the problems found."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(instance, t) for t in names):
            return [f"{path}: expected {types}, got {type(instance).__name__}"]
    if "const" in schema and instance != schema["const"]:
        problems.append(f"{path}: expected {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{path}: {instance!r} not one of {schema['enum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                problems.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if key in props:
                problems += validate(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{path}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "object": dict, "array": list}[name])


# ------------------------------------------------------------------ building the result


def build_result(out, target: dict, mailboxes: dict | None, server_pid: int | None) -> dict:
    """The whole result of a run (see RESULT_SCHEMA) from load.RunOutput."""
    from hdrh.histogram import HdrHistogram

    spec = out.spec
    finals = out.finals
    hists: dict[str, Any] = {}
    for f in finals:
        for label, encoded in f["hists"].items():
            if label in hists:
                hists[label].decode_and_add(encoded)
            else:
                hists[label] = HdrHistogram.decode(encoded)
    window = _sum(f["window"] for f in finals)
    errors = _sum(f["errors"] for f in finals)
    samples: dict[str, list[str]] = {}
    for f in finals:
        for kind, items in f["error_samples"].items():
            bucket = samples.setdefault(kind, [])
            bucket += [s for s in items if s not in bucket][: 5 - len(bucket)]
    if out.crashes:
        errors["client-crash"] = len(out.crashes)
        samples["client-crash"] = [c.strip().splitlines()[-1] for c in out.crashes]
    if spec.duration is not None and spec.scenario != "idle":
        seconds = spec.duration
    else:
        starts = [f["window_start"] for f in finals if f["first_start"]]
        ends = [f["last_end"] for f in finals if f["last_end"]]
        seconds = (max(ends) - max(min(starts),
                                   min(f["window_start"] for f in finals))) / 1e9 if starts and ends else 0.0
    seconds = max(seconds, 1e-9)
    sessions = window.get("sessions", 0)
    client_cpu = sum(
        f["cpu"].get("window_end", f["cpu"].get("end", 0)) - f["cpu"].get("window_start", f["cpu"].get("start", 0))
        for f in finals
    )
    totals = {
        "sessions": sessions,
        "failed_sessions": window.get("failed", 0),
        "started": window.get("started", 0),
        "commands": window.get("commands", 0),
        "messages": window.get("messages", 0),
        "octets": window.get("octets", 0),
        "drained": sum(f["drained"] for f in finals),
        "backlog": sum(f["backlog"] for f in finals),
        "unverified": sum(f["unverified"] for f in finals),
    }
    alls = _sum(f["all"] for f in finals)
    if spec.scenario == "idle":
        totals["opened"] = alls.get("opened", 0)
        totals["ramp_ms"] = int(max((f["all"].get("ramp_ns", 0) for f in finals), default=0) / 1e6)
    server = None
    if server_pid is not None and out.server:
        s = out.server
        server = {
            "pid": server_pid,
            "cpu_seconds": round(s.get("cpu_seconds", 0.0), 3),
            "cpu_s_per_1000_sessions": round(s["cpu_seconds"] / sessions * 1000, 4) if sessions else None,
            "peak_rss_bytes": int(s.get("peak_rss", 0)),
            "processes": int(s.get("processes", 0)),
        }
        if "idle_sessions" in s:
            n = s["idle_sessions"]
            server.update({
                "idle_sessions": n,
                "rss_before_bytes": s["rss_before"], "pss_before_bytes": s["pss_before"],
                "rss_held_bytes": s["rss_held"], "pss_held_bytes": s["pss_held"],
                "rss_per_session_bytes": int((s["rss_held"] - s["rss_before"]) / n),
                "pss_per_session_bytes": int((s["pss_held"] - s["pss_before"]) / n),
            })
    model = "idle" if spec.scenario == "idle" else ("open" if spec.rate else "closed")
    total_errors = sum(errors.values())
    result = {
        "schema": SCHEMA,
        "version": __version__,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ok": total_errors == 0,
        "target": target,
        "scenario": spec.scenario,
        "mix": spec.mix if spec.scenario == "mixed" else None,
        "mailboxes": mailboxes,
        "load": {
            "model": model,
            "connections": spec.connections,
            "rate": spec.rate,
            "duration": spec.duration,
            "sessions": spec.sessions,
            "warmup": spec.warmup,
            "procs": spec.procs,
            "loop": finals[0]["loop"] if finals else spec.loop,
            "timeout": spec.timeout,
        },
        "window_seconds": round(seconds, 4),
        "totals": totals,
        "rates": {
            "sessions_per_s": round(sessions / seconds, 2),
            "started_per_s": round(totals["started"] / seconds, 2),
            "commands_per_s": round(totals["commands"] / seconds, 2),
            "messages_per_s": round(totals["messages"] / seconds, 2),
            "mb_per_s": round(totals["octets"] / seconds / 1e6, 3),
        },
        "latency_us": {label: _summary(hists[label]) for label in LABELS if label in hists},
        "errors": {"total": total_errors, "by_kind": errors, "samples": samples},
        "client": {
            "cpu_seconds": round(client_cpu, 3),
            "cpu_us_per_session": round(client_cpu / sessions * 1e6, 1) if sessions else None,
            "utilisation": round(client_cpu / seconds / max(1, spec.procs), 3),
        },
        "server": server,
        "machine": out.machine,
        "timeline": out.timeline,
    }
    return result


def _sum(dicts) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _summary(h) -> dict:
    out: dict[str, Any] = {"count": h.get_total_count(), "avg": round(h.get_mean_value(), 1)}
    for name, p in PERCENTILES:
        out[name] = h.get_value_at_percentile(p)
    out["max"] = h.get_max_value()
    out["hdr"] = h.encode().decode("ascii")
    return out


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.decode("ascii")
    raise TypeError(f"cannot serialise {type(o).__name__}")


def load_json(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a fastpop bench result (schema {result.get('schema')!r})")
    return result


# ------------------------------------------------------------------ formatting


def ms(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us / 1000:.3f}"
    if us < 100_000:
        return f"{us / 1000:.2f}"
    return f"{us / 1000:,.0f}"


def num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024**2:,.1f} MiB"


def header_lines(info: dict) -> list[tuple[str, str]]:
    """(name, value) rows describing a run before it starts."""
    rows = [("target", info["target"]), ("server", info["server"])]
    rows.append(("scenario", info["scenario"]))
    rows.append(("load", info["load"]))
    rows.append(("client", info["client"]))
    if info.get("mailboxes"):
        rows.append(("mailboxes", info["mailboxes"]))
    return rows


def progress_text(tick: dict, total_seconds: float | None) -> str:
    t = tick["second"]
    of = f"/{total_seconds:g}" if total_seconds else ""
    p99 = ms(tick.get("p99_us")) if "p99_us" in tick else "-"
    parts = [
        f"[{t:>3}s{of}]",
        f"{tick['sessions']:>7,} sess/s",
        f"{tick['commands']:>8,} cmd/s",
        f"{tick['octets'] / 1e6:>8.1f} MB/s",
        f"p99 {p99:>7} ms",
        f"active {tick['active']:>5}",
    ]
    if tick.get("held"):
        parts.append(f"held {tick['held']:,}")
    if "server_rss" in tick:
        parts.append(f"server RSS {mib(tick['server_rss'])}")
    parts.append(f"errors {tick['errors']}")
    return "  ".join(parts)


def summary_renderables(result: dict) -> list:
    """Renderables (fastpop.bench.text): throughput, latency table, server/client, errors."""
    from fastpop.bench.text import table as Table
    from fastpop.bench.text import text

    out: list = []
    r, t = result["rates"], result["totals"]
    thr = Table(title=f"throughput over {result['window_seconds']:g} s", show_header=True, header_style="bold")
    for col in ("sessions/s", "commands/s", "messages/s", "MB/s", "sessions", "failed"):
        thr.add_column(col, justify="right")
    thr.add_row(num(r["sessions_per_s"], 1), num(r["commands_per_s"], 0), num(r["messages_per_s"], 0),
                num(r["mb_per_s"], 2), num(t["sessions"]), num(t["failed_sessions"]))
    if result["scenario"] != "idle":  # idle sessions end after the hold: no throughput to speak of
        out.append(thr)
    lat = Table(title="latency (ms)", header_style="bold")
    lat.add_column("command")
    for col in ("count", "avg", "p50", "p90", "p99", "p99.9", "max"):
        lat.add_column(col, justify="right")
    for label, s in result["latency_us"].items():
        lat.add_row(label, num(s["count"]), ms(s["avg"]), ms(s["p50"]), ms(s["p90"]), ms(s["p99"]),
                    ms(s["p99.9"]), ms(s["max"]))
    out.append(lat)
    notes = []
    c = result["client"]
    notes.append(f"client: {c['cpu_seconds']:.2f} CPU s, {num(c['cpu_us_per_session'])} us per session, "
                 f"{c['utilisation'] * 100:.0f}% of {result['load']['procs']} process(es)")
    m = result.get("machine") or {}
    if m.get("loadavg_before"):
        cpus = m.get("usable_cpus") or 1
        notes.append(f"machine: {cpus} usable CPUs, load average {m['loadavg_before'][0]:g} before, "
                     f"{m['loadavg_after'][0]:g} after")
        if m["loadavg_before"][0] > cpus:
            notes.append("[yellow]the machine was busy before the run started (load average above the CPU count): "
                         "absolute numbers are low and noisy; compare runs made side by side[/yellow]")
    if c["utilisation"] > 0.9:
        notes.append("[yellow]warning: the client processes were nearly saturated; add --procs or the numbers "
                     "measure the client[/yellow]")
    srv = result["server"]
    if srv:
        per = srv["cpu_s_per_1000_sessions"]
        notes.append(f"server: {srv['cpu_seconds']:.2f} CPU s = {num(per, 3)} CPU s per 1,000 sessions, "
                     f"peak RSS {mib(srv['peak_rss_bytes'])} over {srv['processes']} process(es)")
        if "idle_sessions" in srv:
            notes.append(f"idle: {srv['idle_sessions']:,} sessions held; server memory per session "
                         f"RSS {srv['rss_per_session_bytes'] / 1024:,.1f} KiB, "
                         f"PSS {srv['pss_per_session_bytes'] / 1024:,.1f} KiB")
    if "opened" in t:
        notes.append(f"idle: {t['opened']:,} sessions opened in {t['ramp_ms']:,} ms")
    if t["backlog"]:
        notes.append(f"[yellow]open loop: {t['backlog']:,} scheduled sessions never started: every mailbox was "
                     f"busy until the end (rate x session time exceeded the mailboxes): the server did not keep "
                     f"up with the rate, or the run needs more mailboxes[/yellow]")
    if t["unverified"]:
        notes.append(f"[yellow]{t['unverified']:,} messages had no X-Fastpop-Bench-Sha256 header: size checked, "
                     f"content not verified[/yellow]")
    for n in notes:
        out.append(text(n))
    e = result["errors"]
    if e["total"]:
        table = Table(title=f"[bold red]ERRORS: {e['total']:,}[/bold red]", header_style="bold red")
        table.add_column("kind")
        table.add_column("count", justify="right")
        table.add_column("examples")
        for kind, count in sorted(e["by_kind"].items(), key=lambda kv: -kv[1]):
            table.add_row(kind, num(count), "\n".join(e["samples"].get(kind, [])[:3]))
        out.append(table)
        out.append(text(
            "[bold red]THE RUN HAD ERRORS: its numbers do not describe a healthy server.[/bold red]"))
    else:
        out.append(text("[green]no errors[/green]"))
    return out


# ------------------------------------------------------------------ compare


COMPARE_ROWS = (
    ("sessions/s", lambda r: r["rates"]["sessions_per_s"], 1, True),
    ("commands/s", lambda r: r["rates"]["commands_per_s"], 0, True),
    ("messages/s", lambda r: r["rates"]["messages_per_s"], 0, True),
    ("MB/s", lambda r: r["rates"]["mb_per_s"], 2, True),
    ("session p50 ms", lambda r: _lat(r, "session", "p50"), 3, False),
    ("session p99 ms", lambda r: _lat(r, "session", "p99"), 3, False),
    ("session p99.9 ms", lambda r: _lat(r, "session", "p99.9"), 3, False),
    ("server CPU s / 1,000 sessions", lambda r: (r["server"] or {}).get("cpu_s_per_1000_sessions"), 3, False),
    ("server peak RSS MiB", lambda r: _mib_or_none((r["server"] or {}).get("peak_rss_bytes")), 1, False),
    ("client CPU us / session", lambda r: r["client"]["cpu_us_per_session"], 0, False),
    ("errors", lambda r: r["errors"]["total"], 0, False),
)


def _lat(r: dict, label: str, p: str) -> float | None:
    s = r["latency_us"].get(label)
    return None if s is None else s[p] / 1000


def _mib_or_none(n: int | None) -> float | None:
    return None if not n else n / 1024**2


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0 or (isinstance(a, float) and math.isnan(a)):
        return "-"
    return f"{b / a:.2f}x"


def compare_table(results: list[dict], names: list[str]):
    from fastpop.bench.text import table as Table

    table = Table(title="fastpop bench compare", header_style="bold")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    if len(results) == 2:
        table.add_column(f"{names[1]} / {names[0]}", justify="right")
    table.add_row("scenario", *[r["scenario"] for r in results], *([""] if len(results) == 2 else []))
    table.add_row("server", *[r["target"]["server"] for r in results], *([""] if len(results) == 2 else []))
    table.add_row("load", *[_load_text(r) for r in results], *([""] if len(results) == 2 else []))
    for name, get, digits, _higher_better in COMPARE_ROWS:
        values = [get(r) for r in results]
        row = [num(v, digits) for v in values]
        if len(results) == 2:
            row.append(ratio(values[0], values[1]))
        table.add_row(name, *row)
    return table


def _load_text(r: dict) -> str:
    load = r["load"]
    what = f"{load['rate']:g}/s open" if load["rate"] else f"{load['connections']} conns"
    return f"{what}, {load['procs']} procs"


# ------------------------------------------------------------------ plot


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or fastpop[bench])") from None
    tl = result["timeline"]
    if not tl:
        raise RuntimeError("--plot: the run has no per-second data (shorter than a second?)")
    # each point is the second that ends at its label: draw it in the middle of that second
    t = [p["second"] - 0.5 for p in tl]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    lines = ax1.plot(t, [p["sessions"] for p in tl], "o-", label="sessions/s", color="tab:blue")
    ax1.set_ylabel("sessions/s")
    ax1.set_ylim(bottom=0)
    if any(p["octets"] for p in tl):
        ax1b = ax1.twinx()
        lines += ax1b.plot(t, [p["octets"] / 1e6 for p in tl], "s--", label="MB/s", color="tab:orange")
        ax1b.set_ylabel("MB/s")
        ax1b.set_ylim(bottom=0)
    ax1.legend(lines, [x.get_label() for x in lines], loc="lower right", fontsize="small")
    errors = [(p["second"], p["errors"]) for p in tl]
    ax1.set_title(f"{result['scenario']} against {result['target']['server']} ({result['target']['address']})")
    warm = result["load"]["warmup"]
    for ax in (ax1, ax2):
        if warm:
            ax.axvspan(0, warm, color="grey", alpha=0.15, label="warm-up")
        ax.grid(alpha=0.3)
    for key, style in (("p50_us", "-"), ("p90_us", "--"), ("p99_us", "-."), ("max_us", ":")):
        pts = [(p["second"] - 0.5, p[key] / 1000) for p in tl if key in p]
        if pts:
            ax2.plot([x for x, _ in pts], [y for _, y in pts], style, label=key[:-3])
    ax2.set_yscale("log")
    ax2.set_ylabel("session latency (ms)")
    ax2.set_xlabel("second of the run")
    ax2.legend(loc="upper left", fontsize="small")
    if errors and errors[-1][1]:
        ax1.text(0.99, 0.02, f"errors: {errors[-1][1]}", transform=ax1.transAxes, ha="right", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
