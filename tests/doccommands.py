"""The example commands of the documentation, found and classified (issue #19: "every example
command in README/docs either run by a test or marked as illustrative").

Which files: every Markdown file of the checkout (README.md, ARCHITECTURE.md, docs/*.md,
gateway/**/*.md, observability/*.md — a new document is picked up without registering it) and
the comments of `systemd/*`. Hidden folders, `node_modules` and `artifacts` are not documentation.

**Command blocks.** A fenced block is a command block when its language is a shell (`sh`,
`shell`, `bash`, `console`, `zsh`) or, unlabelled, when its first line starts like a command
(`kanmon …`, `sudo …`, `$ …`). Each one carries one tag, an HTML comment on the line(s) right
before the opening fence:

* `<!-- run: tests/unit/test_docs_commands.py -->` — a test runs it: every command line of the
  block (continuation lines joined, `# comments` and a leading `sudo ` dropped) occurs literally
  in that test's source, so the test runs what the document says, not a paraphrase;
* `<!-- walkthrough:gateway -->` (`config`, `device`), in README.md only — the README
  walkthrough (tests/e2e/test_readme_walkthrough.py) runs it;
* `<!-- illustrative: REASON -->` — not run, and REASON says why (a host change, a service, a
  synopsis…). A reason is required.

**Commands in prose.** Every `kanmon …` code span and every `kanmon …` line of a fenced block
is checked against the real argument parser (gateway.cli.build_parser): a synopsis
(`device list/show/revoke`, `[--json]`, `A \\| B`, `…`) must name existing groups, sub-commands and
options; a concrete command (placeholders such as `ID`, `C`, `<state_dir>` filled in, see
Placeholders) must parse as written; a bare name (`kanmon policy apply`) must exist. Scripts of
this checkout named in prose (`bench/x.py --opt`, `python -m pkg`) must exist and take the
options given. System tools named in prose (`systemctl status kanmon`, `nft list table …`,
`journalctl`) are the host's, not ours: not checked.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"node_modules", "artifacts", "__pycache__"}
SHELL_LANGS = {"sh", "shell", "bash", "console", "zsh"}
_COMMAND_START = re.compile(r"^(\$ |sudo |kanmon |\.venv/bin/kanmon |/opt/kanmon/\.venv/bin/kanmon )")
_FENCE = re.compile(r"^( {0,3})(```+)([\w+-]*)[^\n]*$")
_TAG = re.compile(r"<!--\s*(run:\s*(?P<run>\S+)|walkthrough:(?P<walk>gateway|config|device)|"
                  r"illustrative(?::\s*(?P<why>.*?))?)\s*-->\s*$")
_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_KANMON_SPAN = re.compile(r"^(?:sudo )?(?:\S*/)?kanmon(?: [a-z][a-z-]*)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int           # of the opening fence, 1-based
    lang: str
    body: str
    tag: str | None     # "run", "walkthrough", "illustrative" or None
    target: str         # run: the test file; illustrative: the reason; walkthrough: its kind

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    @property
    def is_command(self) -> bool:
        if self.lang in SHELL_LANGS:
            return True
        first = next((ln.strip() for ln in self.body.splitlines() if ln.strip()), "")
        return self.lang == "" and bool(_COMMAND_START.match(first))


def doc_files(root: Path = ROOT) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*.md")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in SKIP_DIRS for p in parts[:-1]):
            continue
        found.append(path)
    found += sorted(p for p in (root / "systemd").glob("*") if p.is_file())
    return found


def fenced_blocks(path: Path, text: str | None = None) -> list[Block]:
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        tag, target = None, ""
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        if k >= 0 and (t := _TAG.search(lines[k].strip())):
            if t.group("run"):
                tag, target = "run", t.group("run")
            elif t.group("walk"):
                tag, target = "walkthrough", t.group("walk")
            else:
                tag, target = "illustrative", (t.group("why") or "").strip()
        blocks.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:j]), tag, target))
        i = j + 1
    return blocks


def command_lines(body: str) -> list[str]:
    """The commands of a block: continuation lines joined, comments and blank lines dropped,
    a leading `$ ` prompt and `sudo ` removed (the tests run as root)."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)            # a trailing comment (`cmd   # why`)
        line = re.sub(r"^\$ ", "", line)
        line = re.sub(r"^sudo ", "", line)
        out.append(line)
    return out


def not_in_test(block: Block, root: Path = ROOT) -> list[str]:
    """What a `run:` block says that its test does not run literally (empty: all of it is run)."""
    test = root / block.target
    if not test.is_file():
        return [f"no such test {block.target}"]
    source = test.read_text()
    return [line for line in command_lines(block.body) if line not in source]


def kanmon_commands(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """[(line, command)] for every `kanmon …` code span and every `kanmon …` line of a fenced
    block (synopses included). `\\|` (a pipe escaped inside a table) reads as `|`."""
    text = path.read_text() if text is None else text
    found: list[tuple[int, str]] = []
    in_block = False
    pending = ""
    last_block_line = -1
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_block = not in_block
            pending = ""
            continue
        if in_block:
            stripped = line.strip()
            if not pending and found and last_block_line == number - 1 and line[:1].isspace() and stripped:
                found[-1] = (found[-1][0], found[-1][1] + " " + re.sub(r"\s+#\s.*$", "", stripped))
                last_block_line = number    # an indented continuation of a synopsis (LANGUAGE.md)
                continue
            if pending:
                pending += " " + stripped
            elif _KANMON_SPAN.match(stripped):
                pending = stripped
            else:
                continue
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            found.append((number, _strip_prefix(pending)))
            last_block_line = number
            pending = ""
            continue
        for span in _SPAN.findall(line):
            span = span.replace("\\|", "|").strip()
            if _KANMON_SPAN.match(span) and not span.startswith("kanmon_"):
                found.append((number, span))
    return found


# ---------------------------------------------------------------- checking against the parser

def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:      # argparse has no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser, deep: bool = False) -> set[str]:
    opts = {s for a in parser._actions for s in a.option_strings}
    if deep:
        for child in _children(parser).values():
            opts |= _options(child, deep=True)
    return opts


def _strip_prefix(command: str) -> str:
    command = re.sub(r"^sudo ", "", command.strip())
    command = re.sub(r"^\S*/kanmon ", "kanmon ", command)
    return re.sub(r"\s+#\s.*$", "", command)


SYNOPSIS_MARKS = re.compile(r"[\[\]|…(]|\.\.\.")
_ALTERNATIVES = re.compile(r"^[a-z][a-z-]*(/[a-z][a-z-]*)+$")      # list/show/revoke (not a path)


def is_synopsis(command: str) -> bool:
    body = re.sub(r'"[^"]*"', "X", _strip_prefix(command))   # a quoted "..." is a value, not an ellipsis
    return bool(SYNOPSIS_MARKS.search(body)) or any(_ALTERNATIVES.match(w) for w in body.split())


def check_synopsis(parser: argparse.ArgumentParser, command: str) -> str | None:
    """None when every group, sub-command and option the synopsis names exists."""
    words = _strip_prefix(command).split()[1:]
    node = parser
    tree_words = []
    for word in words:
        if word.startswith(("-", "[", "(", "<")) or word.isupper():
            break
        children = _children(node)
        if not children:
            break
        alternatives = [w for w in re.split(r"[/|]", word.strip("()[]")) if w and w != "…"]
        if not alternatives:
            break
        missing = [w for w in alternatives if w not in children]
        if missing:
            return f"no sub-command {missing} under `{' '.join(['kanmon'] + tree_words)}`"
        tree_words.append(word)
        if len(alternatives) > 1:
            break
        node = children[alternatives[0]]
    known = _options(parser) | _options(node, deep=True)
    unknown = sorted({o for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command) if o not in known})
    return f"unknown option(s) {unknown} for `{' '.join(['kanmon'] + tree_words)}`" if unknown else None


def is_name_only(parser: argparse.ArgumentParser, command: str) -> bool:
    node = parser
    for word in _strip_prefix(command).split()[1:]:
        children = _children(node)
        if word not in children:
            return False
        node = children[word]
    return True


# Placeholders the documents use, and what a test puts in their place. Substrings first (paths),
# then whole words; a value may depend on the option before it.
@dataclass
class Placeholders:
    config: str
    state: str
    policy: str
    out: str
    eml: str
    extra: dict[str, str] | None = None
    month: str = "2026-12"

    def fill(self, command: str) -> list[str]:
        text = _strip_prefix(command)
        for old, new in (("/etc/kanmon/kanmon.yaml", self.config), ("/var/lib/kanmon", self.state),
                         ("<state_dir>", self.state), ("<state>", self.state), ("STATE/", self.state + "/"),
                         ("DIR/", self.out + "/"), ("<ISO 8601>", "2026-12-01T00:00")):
            text = text.replace(old, new)
        words = shlex.split(text)
        by_option = {"--reason": "lost", "--config": self.config, "--dir": self.state + "/logs",
                     "--logs": self.state + "/logs", "--out": self.out, "--qr-png": self.out + "/phone-12.png",
                     "--mobileconfig": self.out + "/phone-12.mobileconfig", "--rcpt": "someone@example.com",
                     "--private-key-file": self.out + "/phone-12.wg.key", "--retention-days": "1096",
                     "--expiring-days": "30", "--policy": self.policy}
        plain = {"ID": "phone-12", "C": self.config, "FILE": self.policy, "PATH": self.config, "N": "30",
                 "DIR": self.out, "FILE.eml": self.eml, "ADDRESS": "someone@example.com", "USER": "sato",
                 "P": self.policy, "URL": "https://mail.yahoo.co.jp/", "YYYY-MM": self.month,
                 "…": "lost", "...": "lost", **(self.extra or {})}
        out = []
        for i, word in enumerate(words):
            before = words[i - 1] if i else ""
            if before in by_option and (word in plain or word in ("…", "...", "F")):
                out.append(by_option[before])
            else:
                out.append(plain.get(word, word))
        return out[1:]          # without "kanmon"


# ---------------------------------------------------------------- other scripts the documents name

_SCRIPT = re.compile(r"(?:^|\s)(bench/[\w/]+\.py|tests/[\w/]+\.py)|python3? -m ([\w.]+)")


def script_commands(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """[(line, span)] for code spans and block lines that run a script of this checkout
    (`bench/x.py --opt`, `python -m pkg.mod -v`)."""
    text = path.read_text() if text is None else text
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        candidates = _SPAN.findall(line) if "`" in line else []
        found += [(number, c) for c in candidates if _SCRIPT.search(c)]
    return found


def check_script(command: str, root: Path = ROOT) -> str | None:
    """None when the script exists and knows every `--option` the command gives it."""
    m = _SCRIPT.search(command)
    if m is None:
        return None
    target = root / m.group(1) if m.group(1) else root / (m.group(2).replace(".", "/") + ".py")
    if not target.is_file() and m.group(2):
        target = root / m.group(2).replace(".", "/") / "__main__.py"
    if not target.is_file():
        return f"no such script: {target.relative_to(root)}"
    source = target.read_text()
    unknown = [o for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command) if f'"{o}"' not in source]
    return f"{target.relative_to(root)} has no option {unknown}" if unknown else None
