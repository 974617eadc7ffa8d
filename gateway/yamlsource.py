"""YAML loading that remembers where every value came from.

Config and policy files are edited by hand; an error must name the file, the line and the
key. PyYAML's node graph carries marks, so we compose the document once, construct the
plain data from it, and keep a map from each value's path (tuple of keys / indexes) to its
1-based line. jsonschema errors carry the same paths, so they can be pointed at a line.

Operator input is bounded (issue #15): a file is read only when it is a regular file, and
at most ``MAX_YAML_BYTES``; lines, nesting, scalars and integers have limits; anchors,
aliases and merge keys are refused (a 541-byte alias bomb used to take 6 GB), and so is any
tag but the plain standard ones. Whatever is wrong gives a ``file:line`` error in Japanese
and English, never a traceback, and never the text of the file (it may be a secret: a list
pointed at /etc/shadow).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from gateway.i18n import Text, current_lang

PathKey = tuple[Any, ...]

# Bounds on operator YAML (config, policy, mail policy). The shipped files are under 10 kB,
# nest 7 deep, have under 1,000 values and no line over 200 characters; a policy of 10,000
# rules has about 80,000 values. The worst file within the bounds loads in under 2 s CPU
# (bench/loadbounds.py); hostile ones are refused in milliseconds.
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_NODES = 250_000  # values (scalars, lists, mappings): memory and time follow this, not the bytes
MAX_LINE_CHARS = 64 * 1024
MAX_DEPTH = 32
MAX_SCALAR_CHARS = 64 * 1024
MAX_NUMBER_CHARS = 32  # an integer or float as written: far beyond any port, size or count
# A list file (gateway/policy/lists.py, the mail policy's free-mail lists): 64 MiB holds two
# million domains (UT1's largest category is about 1 MB).
MAX_LIST_BYTES = 64 * 1024 * 1024
MAX_ERRORS = 100  # per file: a wrong file (a binary, a password file) gives a page, not a flood

_TAG = "tag:yaml.org,2002:"
# The plain standard tags. Not !!binary, !!set, !!omap, !!pairs (no setting uses them) and
# not !!merge (``<<`` would let a key be overridden without the duplicate-key check).
ALLOWED_TAGS = frozenset(_TAG + t for t in ("null", "bool", "int", "float", "str", "timestamp", "seq", "map"))
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class SourceError:
    """One problem in a source file, printable as ``file:line: key: message``. ``ja``: the
    message in Japanese, when it has one (printed first, as the CLI does, per KANMON_LANG).
    Line 0: the file as a whole (it cannot be read)."""

    filename: str
    line: int
    path: PathKey
    message: str
    ja: str = ""

    @classmethod
    def of(cls, filename: str, line: int, path: PathKey, text: Text) -> "SourceError":
        return cls(filename, line, tuple(path), text.en, text.ja)

    @property
    def dotted(self) -> str:
        return dotted_path(self.path)

    @property
    def text(self) -> str:
        if not self.ja:
            return self.message
        lang = current_lang()
        return self.ja if lang == "ja" else self.message if lang == "en" else f"{self.ja} / {self.message}"

    def __str__(self) -> str:
        where = f"{self.filename}:{self.line}" if self.line > 0 else self.filename
        return f"{where}: {self.dotted}: {self.text}" if self.path else f"{where}: {self.text}"

    def as_text(self) -> Text:
        """The whole line (``file:line: key: message``) in each language."""
        return Text(str(replace(self, message=self.ja or self.message, ja="")), str(replace(self, ja="")))


def errors_text(heading: Text, errors: Sequence[SourceError]) -> Text:
    """A heading and every error, one indented line each, in each language."""
    lines = [e.as_text() for e in errors]
    return Text("\n".join([heading.ja] + [f"  {t.ja}" for t in lines]),
                "\n".join([heading.en] + [f"  {t.en}" for t in lines]))


class SourceErrors(Exception):
    """Raised with every problem found in one file; nothing was applied."""

    def __init__(self, errors: Sequence[SourceError]):
        self.errors = sorted(errors, key=lambda e: (e.filename, e.line))
        super().__init__("\n".join(str(e) for e in self.errors))


class UnreadableSource(SourceErrors):
    """The file itself could not be read (missing, not a regular file, too large, not
    UTF-8): an input error (the commands exit 2), not a mistake inside the file."""


def dotted_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class LoadedYaml:
    filename: str
    data: Any
    lines: dict[PathKey, int]

    def line_of(self, path: Sequence[Any]) -> int:
        """Line of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)

    def error(self, path: Sequence[Any], message: str | Text) -> SourceError:
        if isinstance(message, Text):
            return SourceError.of(self.filename, self.line_of(path), tuple(path), message)
        return SourceError(self.filename, self.line_of(path), tuple(path), message)


# -- reading files -------------------------------------------------------------------------

T_NOT_FOUND = Text("ファイルを読めません: ファイルがありません", "cannot read file: file not found")
T_DENIED = Text("ファイルを読めません: 読み取り権限がありません", "cannot read file: permission denied")
T_OS_ERROR = Text("ファイルを読めません: {e}", "cannot read file: {e}")
T_NOT_REGULAR = Text("ファイルを読めません: 通常のファイルではありません（{kind}）",
                     "cannot read file: not a regular file ({kind})")
T_TOO_LARGE = Text("ファイルが大きすぎます（上限 {limit} バイト）", "file too large (at most {limit} bytes)")
T_NOT_UTF8 = Text("UTF-8 のテキストではありません（{line} 行目）", "not UTF-8 text (line {line})")
_KINDS_JA = {"directory": "ディレクトリ", "character device": "キャラクタデバイス", "block device": "ブロックデバイス",
             "FIFO": "FIFO", "socket": "ソケット"}
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


def read_text_file(path: str | Path, limit: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes. Anything else raises
    ``UnreadableSource`` (one error, line 0 or the line of a bad byte) without blocking: a
    FIFO is opened non-blocking and refused, /dev/zero is refused before a byte is read,
    and nothing is read past ``limit + 1`` bytes."""
    data = read_bytes_file(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UnreadableSource([SourceError.of(str(path), line, (), T_NOT_UTF8.format(line=line))]) from None


def read_bytes_file(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, with the refusals of
    ``read_text_file`` (category feeds: a blacklists.tar.gz, a signature)."""
    p = Path(path)
    name = str(p)

    def fail(text: Text, line: int = 0) -> UnreadableSource:
        return UnreadableSource([SourceError.of(name, line, (), text)])

    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise fail(T_NOT_FOUND) from None
    except PermissionError:
        raise fail(T_DENIED) from None
    except OSError as exc:
        raise fail(T_OS_ERROR.format(e=exc.strerror or type(exc).__name__)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "special file")
            ja = _KINDS_JA.get(kind, "特殊ファイル")
            raise fail(Text(T_NOT_REGULAR.ja.format(kind=ja), T_NOT_REGULAR.en.format(kind=kind)))
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise fail(T_OS_ERROR.format(e=exc.strerror or type(exc).__name__)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise fail(T_TOO_LARGE.format(limit=limit))
    return b"".join(chunks)


# -- parsing -------------------------------------------------------------------------------

T_LINE_TOO_LONG = Text("行が長すぎます（上限 {limit} 文字）", "line too long (at most {limit} characters)")
T_ALIAS = Text("YAML のエイリアス（*名前）は使えません", "YAML aliases (*name) are not allowed")
T_ANCHOR = Text("YAML のアンカー（&名前）は使えません", "YAML anchors (&name) are not allowed")
T_MERGE = Text("YAML のマージキー（<<）は使えません", "YAML merge keys (<<) are not allowed")
T_TOO_MANY_NODES = Text("値が多すぎます（上限 {limit} 個）", "too many values (at most {limit})")
T_TOO_DEEP = Text("入れ子が深すぎます（上限 {limit} 段）", "nested too deeply (at most {limit} levels)")
T_TAG = Text("このタグは使えません: {tag}（使えるのは標準の型だけです）",
             "tag not allowed: {tag} (only the plain standard types are)")
T_SCALAR_TOO_LONG = Text("値が長すぎます（上限 {limit} 文字）", "value too long (at most {limit} characters)")
T_NUMBER_TOO_LONG = Text("数値が長すぎます（上限 {limit} 文字）", "number too long (at most {limit} characters)")
T_BAD_VALUE = Text("{kind}として正しくありません: {detail}", "not a valid {kind}: {detail}")
T_DUPLICATE_CASE = Text("重複したキーです（{line} 行目の {other!r} と大文字・小文字だけが違います）",
                        "duplicate key (differs only in case from {other!r} on line {line})")
T_SYNTAX = Text("YAML の構文エラーです: {problem}", "YAML syntax error: {problem}")
T_DUPLICATE = Text("重複したキーです（最初は {line} 行目）", "duplicate key (first defined on line {line})")
T_CONTROL = Text("文字 U+{char:04X} は YAML に書けません（制御文字）", "character U+{char:04X} is not allowed in YAML (control character)")
T_TOO_MANY = Text("エラーが多すぎるため、ここで検査をやめました（{limit} 件）",
                  "too many errors; stopped checking here ({limit} shown)")
_KIND_OF_TAG = {_TAG + "int": ("整数", "integer"), _TAG + "float": ("数値", "number"),
                _TAG + "timestamp": ("日付・時刻", "date or time"), _TAG + "bool": ("真偽値", "boolean")}


class _Refused(yaml.MarkedYAMLError):
    """A bound or rule of ours, raised from inside PyYAML with the mark of the node."""

    def __init__(self, mark: Any, text: Text):
        super().__init__(problem=text.en, problem_mark=mark)
        self.text = text


try:  # libyaml's parser (PyYAML's C extension): 2-3x faster than the Python one
    from yaml._yaml import CParser as _Parser

    _PARSER_STEPS: tuple[type, ...] = ()
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _Parser = yaml.parser.Parser  # type: ignore[assignment,misc]
    _PARSER_STEPS = (yaml.reader.Reader, yaml.scanner.Scanner)


class _BoundedLoader(yaml.composer.Composer, _Parser, *_PARSER_STEPS, yaml.constructor.SafeConstructor,  # type: ignore[misc]
                     yaml.resolver.Resolver):
    """A safe loader that refuses anchors and aliases and nesting deeper than ``MAX_DEPTH``
    while composing (before anything is built from them), and turns a scalar that does
    not construct (``!!int abc``, ``2025-13-01``) into an error at its line. Events come
    from libyaml's parser; composing stays in Python (``compose_node`` below), so the
    bounds apply as each node arrives. Only safe types are constructed."""

    def __init__(self, stream: str):
        if _PARSER_STEPS:  # pragma: no cover - the pure-Python reader, scanner and parser
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        else:
            _Parser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(event.start_mark, T_ALIAS)
        if event.anchor is not None:
            raise _Refused(event.start_mark, T_ANCHOR)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(event.start_mark, T_TOO_MANY_NODES.format(limit=MAX_NODES))
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(event.start_mark, T_TOO_DEEP.format(limit=MAX_DEPTH))
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError, KeyError, IndexError) as exc:  # KeyError: !!bool maybe (tests/fuzz)
            ja, en = _KIND_OF_TAG.get(node.tag, ("値", "value"))
            detail = str(exc)[:120]
            raise _Refused(node.start_mark, Text(T_BAD_VALUE.ja.format(kind=ja, detail=detail),
                                                 T_BAD_VALUE.en.format(kind=en, detail=detail))) from None


def _long_line(text: str) -> int:
    """The number of the first line longer than ``MAX_LINE_CHARS``, or 0."""
    if len(text) <= MAX_LINE_CHARS:
        return 0
    for lineno, line in enumerate(_LINE_BREAK.split(text), 1):
        if len(line) > MAX_LINE_CHARS:
            return lineno
    return 0


def load_yaml_text(text: str, filename: str = "<string>") -> LoadedYaml:
    """Parse one YAML document (safe types only, within the bounds above). Raises
    SourceErrors on syntax errors, on anything over a bound, and on duplicate mapping keys,
    which PyYAML would otherwise silently resolve to the last one."""
    if len(text) > MAX_YAML_BYTES:
        raise SourceErrors([SourceError.of(filename, 1, (), T_TOO_LARGE.format(limit=MAX_YAML_BYTES))])
    long_line = _long_line(text)
    if long_line:
        raise SourceErrors([SourceError.of(filename, long_line, (), T_LINE_TOO_LONG.format(limit=MAX_LINE_CHARS))])
    try:
        loader = _BoundedLoader(text)  # checks every character first: may raise ReaderError
    except yaml.reader.ReaderError as exc:
        raise SourceErrors([_reader_error(exc, text, filename)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return LoadedYaml(filename, None, {(): 1})
        lines: dict[PathKey, int] = {}
        errors: list[SourceError] = []
        _walk(node, (), lines, errors, filename, loader)
        if errors:
            raise SourceErrors(_capped(errors, filename))
        data = loader.construct_document(node)
    except _Refused as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise SourceErrors([SourceError.of(filename, line, (), exc.text)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = str(exc.problem or exc)[:200]
        raise SourceErrors([SourceError.of(filename, line, (), T_SYNTAX.format(problem=problem))]) from None
    except yaml.reader.ReaderError as exc:
        raise SourceErrors([_reader_error(exc, text, filename)]) from None
    except yaml.YAMLError as exc:
        raise SourceErrors([SourceError.of(filename, 1, (), T_SYNTAX.format(problem=str(exc)[:200]))]) from None
    finally:
        loader.dispose()
    return LoadedYaml(filename, data, lines)


def _capped(errors: list[SourceError], filename: str) -> list[SourceError]:
    if len(errors) <= MAX_ERRORS:
        return errors
    kept = errors[:MAX_ERRORS]
    return kept + [SourceError.of(filename, kept[-1].line, (), T_TOO_MANY.format(limit=MAX_ERRORS))]


def _reader_error(exc: yaml.reader.ReaderError, text: str, filename: str) -> SourceError:
    """A character YAML does not allow (a control character, found by fuzzing): PyYAML
    raises it before parsing, with a character offset instead of a mark."""
    position = exc.position if isinstance(exc.position, int) else 0
    line = text.count("\n", 0, position) + 1
    char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    return SourceError.of(filename, line, (), T_CONTROL.format(char=char))


def load_yaml_file(path: str | Path) -> LoadedYaml:
    p = Path(path)
    return load_yaml_text(read_text_file(p, MAX_YAML_BYTES), str(p))


def _walk(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], errors: list[SourceError], filename: str,
          loader: _BoundedLoader) -> None:
    """Record each value's line; check tags, scalar sizes and duplicate keys, and build the
    typed scalars (the loader keeps them), so that ``2025-13-01`` is reported with its key.
    Recursion is bounded: the composer refused nesting deeper than MAX_DEPTH."""
    line = node.start_mark.line + 1
    lines[path] = line
    if node.tag not in ALLOWED_TAGS:
        tag = node.tag.replace(_TAG, "!!")
        errors.append(SourceError.of(filename, line, path, T_TAG.format(tag=tag if len(tag) <= 40 else tag[:40] + "…")))
        return
    if isinstance(node, yaml.ScalarNode):
        if node.tag in (_TAG + "int", _TAG + "float") and len(node.value) > MAX_NUMBER_CHARS:
            errors.append(SourceError.of(filename, line, path, T_NUMBER_TOO_LONG.format(limit=MAX_NUMBER_CHARS)))
        elif len(node.value) > MAX_SCALAR_CHARS:
            errors.append(SourceError.of(filename, line, path, T_SCALAR_TOO_LONG.format(limit=MAX_SCALAR_CHARS)))
        elif node.tag in _KIND_OF_TAG:
            try:
                loader.construct_object(node)
            except _Refused as exc:
                errors.append(SourceError.of(filename, line, path, exc.text))
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _TAG + "merge":
                errors.append(SourceError.of(filename, key_line, path, T_MERGE))
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            if key in seen:
                errors.append(SourceError.of(filename, key_line, path + (key,), T_DUPLICATE.format(line=seen[key])))
            seen[key] = key_line
            _walk(key_node, path + (key,), {}, errors, filename, loader)
            _walk(value_node, path + (key,), lines, errors, filename, loader)
            lines[path + (key,)] = key_line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines, errors, filename, loader)


def duplicate_folded_keys(doc: LoadedYaml, path: PathKey, mapping: Mapping[Any, Any],
                          fold: Any = str.lower) -> list[SourceError]:
    """Keys of ``mapping`` (at ``path`` in ``doc``) that are equal after ``fold``: for the
    names the engine compares without case (platforms), where ``ios`` and ``IOS`` would
    otherwise silently override each other."""
    errors: list[SourceError] = []
    first: dict[Any, Any] = {}
    for key in mapping:
        folded = fold(str(key))
        if folded in first:
            other = first[folded]
            errors.append(doc.error(path + (key,), T_DUPLICATE_CASE.format(other=str(other)[:60],
                                                                           line=doc.line_of(path + (other,)))))
        else:
            first[folded] = key
    return errors


def schema_errors(doc: LoadedYaml, schema: Mapping[str, Any]) -> list[SourceError]:
    """Validate ``doc.data`` against a JSON schema; every error pointed at its line."""
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    out: list[SourceError] = []
    for err in validator.iter_errors(doc.data):
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
            allowed = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - allowed, key=str):
                known = ", ".join(sorted(allowed))
                out.append(doc.error(path + (extra,), T_UNKNOWN_KEY.format(known=known)))
            continue
        out.append(doc.error(path, _schema_text(err)))
        if len(out) >= MAX_ERRORS:
            break
    return out


T_UNKNOWN_KEY = Text("不明なキーです（使えるキー: {known}）", "unknown key (known keys: {known})")
# jsonschema's messages are English; the ones an operator meets, in Japanese too (issue #19:
# KANMON_LANG=ja turns the details Japanese). {v}: the value as jsonschema quotes it.
_SCHEMA_JA = {
    "required": "必須のキー {v} がありません",
    "type": "型が違います（{expected} で書いてください）",
    "enum": "{v} は使えません（使える値: {expected}）",
    "const": "{v} は使えません（{expected} だけです）",
    "minimum": "{v} は小さすぎます（最小 {expected}）",
    "exclusiveMinimum": "{v} は小さすぎます（{expected} より大きくしてください）",
    "maximum": "{v} は大きすぎます（最大 {expected}）",
    "exclusiveMaximum": "{v} は大きすぎます（{expected} より小さくしてください）",
    "pattern": "{v} は書式に合いません（{expected}）",
    "minLength": "{v} は短すぎます（{expected} 文字以上）",
    "maxLength": "{v} は長すぎます（{expected} 文字まで）",
    "minItems": "項目が少なすぎます（{expected} 個以上）",
    "maxItems": "項目が多すぎます（{expected} 個まで）",
    "uniqueItems": "同じ項目が重複しています",
    "format": "{v} は {expected} の形式ではありません",
    "oneOf": "{v} はどの書き方にも合いません",
    "anyOf": "{v} はどの書き方にも合いません",
    "not": "{v} はここでは使えません",
    "minProperties": "キーが少なすぎます（{expected} 個以上）",
    "maxProperties": "キーが多すぎます（{expected} 個まで）",
}
_JA_TYPES = {"string": "文字列", "integer": "整数", "number": "数値", "boolean": "真偽値 (true/false)",
             "array": "リスト", "object": "キーと値の組 (マッピング)", "null": "null"}


def _schema_text(err: Any) -> Text:
    """One jsonschema error as a bilingual Text (English: jsonschema's own message, clipped)."""
    en = _clip(err.message)
    template = _SCHEMA_JA.get(err.validator)
    if template is None:
        return Text(f"値が正しくありません: {en}", en)
    expected = err.validator_value
    if err.validator == "type":
        names = expected if isinstance(expected, list) else [expected]
        expected = "・".join(_JA_TYPES.get(str(n), str(n)) for n in names)
    elif err.validator == "required":
        missing = en.split(" is a required property", 1)[0]   # jsonschema names one missing key per error
        return Text(template.format(v=missing), en)
    elif isinstance(expected, (list, tuple)):
        expected = ", ".join(str(e) for e in expected)
    value = _clip(repr(err.instance), 80)
    return Text(template.format(v=value, expected=_clip(str(expected), 120)), en)


def _clip(message: str, limit: int = 200) -> str:
    """jsonschema quotes the offending value in full: a 60 kB string would be printed whole."""
    return message if len(message) <= limit else message[:limit] + "…"
