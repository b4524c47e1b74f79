"""Safe YAML loading that remembers where every key came from (file:line).

Only yaml.SafeLoader is used (no arbitrary objects). `load_yaml` returns plain
dicts/lists plus a map from key path (tuple) to line number, so validation errors
can say `profiles/compact.yaml:14: types.routed_expert.edge: ...`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apex_orch.core.errors import ApexError, ProfileError
from apex_orch.core.infiles import KINDS, read_input
from apex_orch.core.translate import translate_yaml_error


@dataclass
class YamlDoc:
    path: Path
    data: Any                  # plain data (dicts, lists, scalars): each reader checks it with its schema
    lines: dict[tuple[Any, ...], int]                  # key path -> line of its key (of the item, in a list)
    # key path -> line where its value begins: a mapping written under `key:` begins on the next
    # line; () is the document's first value
    value_lines: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def where(self, key_path: tuple[Any, ...] = ()) -> str:
        """`file:line` for a key path, falling back to its nearest known parent."""
        kp = tuple(key_path)
        while kp and kp not in self.lines:
            kp = kp[:-1]
        line = self.lines.get(kp, 1)
        return f"{self.path}:{line}"

    def where_value(self, key_path: tuple[Any, ...] = ()) -> str:
        """`file:line` where the value at a key path begins (line 1 when unknown)."""
        return f"{self.path}:{self.value_lines.get(tuple(key_path), 1)}"


# The only tags a config may carry: YAML's core schema (what SafeLoader resolves implicitly).
# Anything else (!!python/object, !!binary, custom !tags) is refused with file:line, never
# constructed and never silently dropped.
ALLOWED_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                         ("map", "seq", "str", "int", "float", "bool", "null", "timestamp"))


def _convert(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int],
             value_lines: dict[tuple[Any, ...], int], src: Path, error_cls: type[ApexError]) -> Any:
    value_lines[path] = node.start_mark.line + 1
    if node.tag not in ALLOWED_TAGS:
        raise error_cls(f"YAML tag {node.tag!r} is not allowed (configs are plain data: mappings, lists, "
                        "strings, numbers, booleans)", where=f"{src}:{node.start_mark.line + 1}",
                        hint="remove the tag; apex-orch loads YAML with safe loading only")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise error_cls("mapping keys must be plain strings",
                                where=f"{src}:{key_node.start_mark.line + 1}")
            key = key_node.value
            if key in out:
                raise error_cls(f"duplicate key {key!r}", where=f"{src}:{key_node.start_mark.line + 1}",
                                hint="each key may appear once per mapping")
            kp = path + (key,)
            lines[kp] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, kp, lines, value_lines, src, error_cls)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, child in enumerate(node.value):
            kp = path + (i,)
            lines[kp] = child.start_mark.line + 1
            items.append(_convert(child, kp, lines, value_lines, src, error_cls))
        return items
    # Scalars: let SafeLoader resolve the tag (int, float, bool, null, str).
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:   # e.g. '!!int abc'
        raise error_cls(f"bad value: {getattr(exc, 'problem', None) or exc}",
                        where=f"{src}:{node.start_mark.line + 1}") from None
    finally:
        loader.dispose()


# Bounds on a config file (profiles, corpora, release configs are a few KB): its size, and the
# number of values it holds once aliases are expanded (a "billion laughs" document is a few
# lines whose aliases expand to billions of values).
MAX_CONFIG_BYTES = KINDS["config"].max_bytes
MAX_YAML_VALUES = 100_000


def read_config_text(path: Path, error_cls: type[ApexError] = ProfileError) -> str:
    """A config file's text, refusing one larger than MAX_CONFIG_BYTES or not a regular file
    (core.infiles: the one way inputs are opened)."""
    raw = read_input(path, "config", error=error_cls)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error_cls(f"cannot read file: not UTF-8 text ({exc.reason} at byte {exc.start})",
                        where=str(path)) from None


def check_yaml_size(node: yaml.Node | None, src: Path, error_cls: type[ApexError] = ProfileError) -> None:
    """Refuse a document that holds more than MAX_YAML_VALUES values once aliases are expanded,
    naming the top-level key (and line) where the count runs over. Linear in the node graph."""
    memo: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        memo[key] = 1   # a recursive alias (not possible in YAML 1.1, but cheap to guard)
        total = 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > MAX_YAML_VALUES:
                    break
        elif isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > MAX_YAML_VALUES:
                    break
        memo[key] = total
        return total

    def refuse(what: str, mark: Any) -> None:
        raise error_cls(f"{what} expands to more than {MAX_YAML_VALUES:,} values (YAML aliases repeating "
                        "other values)", where=f"{src}:{mark.line + 1}",
                        hint="configs are small: write the values out, or use fewer nested aliases")

    if node is None:
        return
    if isinstance(node, yaml.MappingNode):
        total = 1
        for k, v in node.value:
            total += size(k) + size(v)
            if total > MAX_YAML_VALUES:
                refuse(f"key {getattr(k, 'value', '?')!r}", k.start_mark)
    elif size(node) > MAX_YAML_VALUES:
        refuse("the document", node.start_mark)


def compose_config(text: str, path: Path, error_cls: type[ApexError] = ProfileError,
                   loader_cls: type[yaml.SafeLoader] = yaml.SafeLoader) -> yaml.Node | None:
    """yaml.compose with the size bound; deep nesting is one error, not a RecursionError."""
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
        check_yaml_size(node, path, error_cls)
        return node
    except RecursionError:
        raise error_cls("YAML is nested too deeply", where=str(path), hint="configs are a few levels deep") from None
    finally:
        loader.dispose()


def load_yaml(path: Path, error_cls: type[ApexError] = ProfileError) -> YamlDoc:
    text = read_config_text(path, error_cls)
    try:
        node = compose_config(text, path, error_cls)
    except yaml.YAMLError as exc:
        raise (translate_yaml_error(exc, path, error_cls) or error_cls(str(exc), where=str(path))) from None
    return node_to_doc(node, path, error_cls)


def node_to_doc(node: yaml.Node | None, path: Path, error_cls: type[ApexError] = ProfileError) -> YamlDoc:
    """A composed document (compose_config) as plain data with its line maps; an empty
    document is {}. Separate from load_yaml for a caller that words YAML syntax errors itself."""
    lines: dict[tuple[Any, ...], int] = {}
    value_lines: dict[tuple[Any, ...], int] = {}
    try:
        data = {} if node is None else _convert(node, (), lines, value_lines, path, error_cls)
    except RecursionError:
        raise error_cls("YAML is nested too deeply", where=str(path), hint="configs are a few levels deep") from None
    return YamlDoc(path, data, lines, value_lines)
