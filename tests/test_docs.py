"""The documentation cannot drift from the code.

docs/configuration.md is checked against the settings' own definitions: the
``Config`` dataclass and the ``_TOML_KEYS`` table of fastpop/config.py, the
flags of ``fastpop serve`` (fastpop/cli.py) and the settings a SIGHUP cannot
change (fastpop/serve/server.py).  Every relative link and every repository
file named in README.md and docs/*.md must exist, every TOML example must
load, README.md must keep its two commands for a fresh machine and take its
headline figures from benchmarks/README.md, and docs/architecture.md must name
every module of the layers.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from fastpop.cli import build_parser
from fastpop.config import _TOML_KEYS, Config, load_toml

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
CONFIGURATION = DOCS / "configuration.md"
ARCHITECTURE = DOCS / "architecture.md"
PERFORMANCE = DOCS / "performance.md"
BENCHMARKS = REPO / "benchmarks" / "README.md"

if not (REPO / "fastpop" / "__init__.py").exists():
    # scripts/check-wheel and cibuildwheel run tests/ against an installed wheel, outside the sources
    pytest.skip("the documentation is checked in a source tree", allow_module_level=True)

# The two commands README.md gives for a fresh machine (CI runs the second: .ci/run).
FRESH_MACHINE = ("```sh\npython3 -m pip install . && fastpop serve --demo\n```", "```sh\n./scripts/test\n```")

# Defaults that depend on the machine, documented as "computed: ...".
COMPUTED = {"hostname": socket.gethostname, "workers": lambda: os.cpu_count() or 1}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ----------------------------------------------------------------- markdown


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def cells(line: str) -> list[str]:
    """A table row's cells; a | inside a code span does not split."""
    out, cell, code = [], [], False
    for c in line.strip().strip("|"):
        if c == "`":
            code = not code
        if c == "|" and not code:
            out.append("".join(cell).strip())
            cell = []
        else:
            cell.append(c)
    out.append("".join(cell).strip())
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", without_code_blocks(path.read_text()), re.MULTILINE):
        base = slug(heading)
        name, n = base, 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def section(text: str, heading: str) -> str:
    """From the heading line to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    found = re.search(rf"^{re.escape(heading)}\b.*$", text, re.MULTILINE)
    assert found, f"no section {heading!r}"
    start = found.start()
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, start + len(heading))
    return text[start : end.start() if end else len(text)]


# ----------------------------------------------------------------- docs/configuration.md


class Row:
    def __init__(self, section: str, key: str, flag: str, default: str, meaning: str, lineno: int) -> None:
        self.section, self.key, self.flag, self.default, self.meaning, self.lineno = (
            section, key, flag, default, meaning, lineno)

    @property
    def name(self) -> str:
        return f"[{self.section}] {self.key} (docs/configuration.md:{self.lineno})"


def reference() -> list[Row]:
    """The rows of the per-section tables: ## `[section]`, then | key | flag | default | meaning |."""
    rows, current, header = [], None, None
    for lineno, line in enumerate(without_code_blocks(CONFIGURATION.read_text()).splitlines(), 1):
        m = re.match(r"^## `\[(\w+)\]`", line)
        if m:
            current, header = m.group(1), None
            continue
        if line.startswith("#"):
            current = header = None
            continue
        if current is None or not line.startswith("|"):
            header = None if not line.startswith("|") else header
            continue
        row = cells(line)
        if header is None:
            header = row
            assert header == ["key", "flag", "default", "meaning"], (
                f"docs/configuration.md:{lineno}: a [{current}] table's columns must be key | flag | default | meaning")
            continue
        if set("".join(row)) <= set("-: "):
            continue  # the separator line
        assert len(row) == 4 and re.fullmatch(r"`\w+`",
                                              row[0]), f"docs/configuration.md:{lineno}: not a key row: {line}"
        rows.append(Row(current, row[0].strip("`"), row[1], row[2], row[3], lineno))
    return rows


def documented() -> dict[tuple[str, str], Row]:
    return {(r.section, r.key): r for r in reference()}


FIELDS = {f.name: f for f in fields(Config)}


def test_every_config_field_has_one_toml_key():
    keys_of: dict[str, list[str]] = {}
    for (sect, key), name in _TOML_KEYS.items():
        keys_of.setdefault(name, []).append(f"[{sect}] {key}")
    unset = sorted(set(FIELDS) - set(keys_of))
    assert not unset, f"Config fields no TOML key sets (fastpop/config.py _TOML_KEYS): {unset}"
    twice = {name: keys for name, keys in keys_of.items() if len(keys) > 1}
    assert not twice, f"Config fields set by two TOML keys: {twice}"
    unknown = sorted(name for name in keys_of if name not in FIELDS)
    assert not unknown, f"_TOML_KEYS names fields Config does not have: {unknown}"


def test_every_toml_key_is_documented():
    rows = documented()
    missing = [f"[{s}] {k} (Config.{_TOML_KEYS[s, k]})" for s, k in _TOML_KEYS if (s, k) not in rows]
    assert not missing, "docs/configuration.md does not document these settings:\n  " + "\n  ".join(missing)


def test_no_documented_key_that_does_not_exist():
    extra = [row.name for key, row in documented().items() if key not in _TOML_KEYS]
    assert not extra, ("docs/configuration.md documents settings fastpop/config.py does not have "
                       "(load_toml refuses them):\n  " + "\n  ".join(extra))


def test_no_key_documented_twice():
    seen: dict[tuple[str, str], Row] = {}
    twice = []
    for row in reference():
        if (row.section, row.key) in seen:
            twice.append(f"{row.name}, first at line {seen[row.section, row.key].lineno}")
        seen[row.section, row.key] = row
    assert not twice, "documented twice:\n  " + "\n  ".join(twice)


def test_documented_defaults_are_configs(tmp_path):
    """A default in backticks is a TOML value: loaded as a file would be, it
    must give Config's default.  'unset' means None; 'computed' a default
    that depends on the machine (COMPUTED)."""
    defaults = Config()
    literal: dict[tuple[str, str], Row] = {}
    wrong = []
    for (sect, key), row in documented().items():
        name = _TOML_KEYS.get((sect, key))
        if name is None:
            continue  # test_no_documented_key_that_does_not_exist
        value = getattr(defaults, name)
        if re.fullmatch(r"`[^`]+`", row.default):
            literal[sect, key] = row
        elif row.default.startswith("unset"):
            if value is not None:
                wrong.append(f"{row.name}: documented unset, Config.{name} defaults to {value!r}")
        elif row.default.startswith("computed"):
            if name not in COMPUTED:
                wrong.append(f"{row.name}: documented computed, but Config.{name} has the fixed default {value!r}")
            elif value != COMPUTED[name]() or FIELDS[name].default_factory is MISSING:
                wrong.append(f"{row.name}: documented computed, Config.{name} defaults to {value!r}")
        else:
            wrong.append(f"{row.name}: the default must be a TOML value in backticks, 'unset ...' or 'computed: ...', "
                         f"not {row.default!r}")
    for (sect, key), name in _TOML_KEYS.items():
        row = documented().get((sect, key))
        if name in COMPUTED and row is not None and not row.default.startswith("computed"):
            wrong.append(f"{row.name}: Config.{name} depends on the machine; document it as 'computed: ...'")
    # Each literal through the same loader as a user's file.
    for (sect, key), row in sorted(literal.items()):
        name = _TOML_KEYS[sect, key]
        path = tmp_path / f"{sect}.{key}.toml"
        path.write_text(f"[{sect}]\n{key} = {row.default.strip('`')}\n")
        try:
            got = getattr(load_toml(str(path)), name)
        except ValueError as exc:  # TOMLDecodeError is one too
            wrong.append(f"{row.name}: documented default {row.default} is not a value of this setting: {exc}")
            continue
        want = getattr(defaults, name)
        if got != want or type(got) is not type(want):
            wrong.append(f"{row.name}: documented default {row.default}, Config.{name} defaults to {want!r}")
    assert not wrong, "documented defaults that are not Config's:\n  " + "\n  ".join(wrong)


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_documented_flags_are_the_parsers():
    flags_of: dict[str, set[str]] = {}
    for action in serve_parser()._actions:
        flags_of.setdefault(action.dest, set()).update(action.option_strings)
    wrong = []
    for (sect, key), row in documented().items():
        name = _TOML_KEYS.get((sect, key))
        if name is None:
            continue
        said = set(re.findall(r"`(--?[\w-]+)`", row.flag))
        if not said and row.flag not in ("—", "-", ""):
            wrong.append(f"{row.name}: the flag column must hold `--flag` or —, not {row.flag!r}")
        has = flags_of.get(name, set())
        if said != has:
            wrong.append(f"{row.name}: documented flag {sorted(said) or 'none'}, "
                         f"fastpop serve has {sorted(has) or 'none'} for Config.{name}")
    assert not wrong, "\n".join(wrong)


def test_every_flag_of_serve_is_documented():
    text = CONFIGURATION.read_text()
    missing = [opt for action in serve_parser()._actions for opt in action.option_strings
               if opt.startswith("--") and opt != "--help" and f"`{opt}`" not in text]
    assert not missing, f"flags of fastpop serve that docs/configuration.md does not name: {missing}"


def test_restart_only_settings_are_documented():
    from fastpop.serve.server import RESTART_ONLY

    part = section(CONFIGURATION.read_text(), "## Reloading")
    items = re.search(r"^- .*?(?=\n\n|\Z)", part, re.MULTILINE | re.DOTALL)
    assert items, "docs/configuration.md ## Reloading: no list of the settings that need a restart"
    said: set[str] = set()
    for sect, key in re.findall(r"`\[(\w+)\](?: (\w+))?`", items.group(0)):
        names = [v for (s, k), v in _TOML_KEYS.items() if s == sect and (k == key or not key)]
        assert names, f"docs/configuration.md ## Reloading names [{sect}] {key}, which is no setting"
        said.update(names)
    assert said == set(RESTART_ONLY), (
        f"## Reloading lists {sorted(said - set(RESTART_ONLY))} that SIGHUP changes, "
        f"and misses {sorted(set(RESTART_ONLY) - said)} (fastpop/serve/server.py RESTART_ONLY)")


# ----------------------------------------------------------------- every page


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_resolve(page):
    text = without_code_blocks(page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(page)}: broken links:\n  " + "\n  ".join(broken)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_named_files_exist(page):
    spans = re.findall(r"`([^`\n]+)`", without_code_blocks(page.read_text()))
    named = {s for s in spans if re.fullmatch(r"(fastpop|tests|benchmarks|contrib|docs|scripts|fuzz|\.github)/[\w./-]*",
                                              s)}
    missing = sorted(s for s in named if not (REPO / s).exists())
    assert not missing, f"{rel(page)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_toml_examples_load(page, tmp_path):
    for n, block in enumerate(code_blocks(page.read_text(), "toml")):
        path = tmp_path / f"example{n}.toml"
        path.write_text(block)
        try:
            load_toml(str(path))
        except ValueError as exc:  # TOMLDecodeError is one too
            pytest.fail(f"{rel(page)}: TOML example {n + 1} does not load: {exc}")


# ----------------------------------------------------------------- README.md


def test_readme_gives_the_two_commands_for_a_fresh_machine():
    text = README.read_text()
    for block in FRESH_MACHINE:
        assert block in text, f"README.md must show, verbatim:\n{block}"
    assert FRESH_MACHINE[0] in section(text, "## Try it"), "the demo command belongs in README.md's 'Try it' section"


FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:x\b| ?(?:ms|us|KiB|MiB|MB/s)\b)")


@pytest.mark.parametrize("where", ["README.md headline numbers", "docs/performance.md"])
def test_figures_come_from_the_benchmarks(where):
    """Ratios, times and sizes quoted as results are copied from benchmarks/README.md."""
    if where.startswith("README"):
        text = section(README.read_text(), "## Headline numbers")
        assert "benchmarks/README.md" in text, "the headline numbers must link to where they are measured"
    else:
        text = PERFORMANCE.read_text()
    measured = BENCHMARKS.read_text()
    invented = sorted({f for f in FIGURE.findall(without_code_blocks(text)) if f not in measured})
    assert not invented, f"{where}: figures that benchmarks/README.md does not give: {invented}"


# ----------------------------------------------------------------- docs/architecture.md


def test_architecture_names_every_module():
    package = REPO / "fastpop"
    layers = ("wire", "store", "auth", "session", "proxy", "delivery", "serve")
    modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
    for layer in layers:
        modules += [p for p in (package / layer).iterdir() if p.suffix in (".py", ".pyx") and p.name != "__init__.py"]
    text = ARCHITECTURE.read_text()
    missing = sorted(rel(p) for p in modules if f"`{rel(p)}`" not in text)
    missing += [f"fastpop/{d.name}/" for d in package.iterdir()
                if (d / "__init__.py").exists() and f"`fastpop/{d.name}/`" not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"
