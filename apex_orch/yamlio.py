"""Safe YAML loading that remembers where every key came from (file:line).

Only yaml.SafeLoader is used (no arbitrary objects). `load_yaml` returns plain
dicts/lists plus a map from key path (tuple) to line number, so validation errors
can say `profiles/compact.yaml:14: types.routed_expert.edge: ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from apex_orch.errors import ProfileError


@dataclass
class YamlDoc:
    path: Path
    data: object
    lines: dict[tuple, int]

    def where(self, key_path: tuple = ()) -> str:
        """`file:line` for a key path, falling back to its nearest known parent."""
        kp = tuple(key_path)
        while kp and kp not in self.lines:
            kp = kp[:-1]
        line = self.lines.get(kp, 1)
        return f"{self.path}:{line}"


# The only tags a config may carry: YAML's core schema (what SafeLoader resolves implicitly).
# Anything else (!!python/object, !!binary, custom !tags) is refused with file:line, never
# constructed and never silently dropped.
ALLOWED_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                         ("map", "seq", "str", "int", "float", "bool", "null", "timestamp"))


def _convert(node, path: tuple, lines: dict, src: Path, error_cls):
    if node.tag not in ALLOWED_TAGS:
        raise error_cls(f"YAML tag {node.tag!r} is not allowed (configs are plain data: mappings, lists, "
                        "strings, numbers, booleans)", where=f"{src}:{node.start_mark.line + 1}",
                        hint="remove the tag; apex-orch loads YAML with safe loading only")
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
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
            out[key] = _convert(value_node, kp, lines, src, error_cls)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, child in enumerate(node.value):
            kp = path + (i,)
            lines[kp] = child.start_mark.line + 1
            items.append(_convert(child, kp, lines, src, error_cls))
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


def load_yaml(path: Path, error_cls=ProfileError) -> YamlDoc:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error_cls("file not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error_cls(f"cannot read file: {exc}", where=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error_cls(f"malformed YAML: {problem}", where=where,
                        hint="check indentation and quoting around that line") from None
    lines: dict[tuple, int] = {}
    data = {} if node is None else _convert(node, (), lines, path, error_cls)
    return YamlDoc(path, data, lines)
