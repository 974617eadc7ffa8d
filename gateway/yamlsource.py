"""YAML loading that remembers where every value came from.

Config and policy files are edited by hand; an error must name the file, the line and the
key. PyYAML's node graph carries marks, so we compose the document once, construct the
plain data from it, and keep a map from each value's path (tuple of keys / indexes) to its
1-based line. jsonschema errors carry the same paths, so they can be pointed at a line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PathKey = tuple[Any, ...]


@dataclass(frozen=True)
class SourceError:
    """One problem in a source file, printable as ``file:line: key: message``."""

    filename: str
    line: int
    path: PathKey
    message: str

    @property
    def dotted(self) -> str:
        return dotted_path(self.path)

    def __str__(self) -> str:
        where = f"{self.filename}:{self.line}"
        return f"{where}: {self.dotted}: {self.message}" if self.path else f"{where}: {self.message}"


class SourceErrors(Exception):
    """Raised with every problem found in one file; nothing was applied."""

    def __init__(self, errors: Sequence[SourceError]):
        self.errors = sorted(errors, key=lambda e: (e.filename, e.line))
        super().__init__("\n".join(str(e) for e in self.errors))


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

    def error(self, path: Sequence[Any], message: str) -> SourceError:
        return SourceError(self.filename, self.line_of(path), tuple(path), message)


def load_yaml_text(text: str, filename: str = "<string>") -> LoadedYaml:
    """Parse one YAML document (safe types only). Raises SourceErrors on syntax errors and
    on duplicate mapping keys, which PyYAML would otherwise silently resolve to the last one."""
    try:
        loader = yaml.SafeLoader(text)  # checks every character first: may raise ReaderError
    except yaml.reader.ReaderError as exc:
        raise SourceErrors([_reader_error(exc, text, filename)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return LoadedYaml(filename, None, {(): 1})
        lines: dict[PathKey, int] = {}
        errors: list[SourceError] = []
        _walk(node, (), lines, errors, filename)
        if errors:
            raise SourceErrors(errors)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise SourceErrors([SourceError(filename, line, (), f"YAML syntax error: {exc.problem or exc}")]) from None
    except yaml.reader.ReaderError as exc:
        raise SourceErrors([_reader_error(exc, text, filename)]) from None
    except yaml.YAMLError as exc:
        raise SourceErrors([SourceError(filename, 1, (), f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()
    return LoadedYaml(filename, data, lines)


def _reader_error(exc: yaml.reader.ReaderError, text: str, filename: str) -> SourceError:
    """A character YAML does not allow (a control character, found by fuzzing): PyYAML
    raises it before parsing, with a character offset instead of a mark."""
    position = exc.position if isinstance(exc.position, int) else 0
    line = text.count("\n", 0, position) + 1
    char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    return SourceError(filename, line, (), f"character U+{char:04X} is not allowed in YAML (control character)")


def load_yaml_file(path: str | Path) -> LoadedYaml:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceErrors([SourceError(str(p), 1, (), f"cannot read file: {exc}")]) from None
    return load_yaml_text(text, str(p))


def _walk(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], errors: list[SourceError], filename: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":
                errors.append(SourceError(filename, line, path + (key,), f"duplicate key (first defined on line {seen[key]})"))
            seen[key] = line
            _walk(value_node, path + (key,), lines, errors, filename)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines, errors, filename)


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
                out.append(doc.error(path + (extra,), f"unknown key (known keys: {known})"))
            continue
        out.append(doc.error(path, err.message))
    return out
