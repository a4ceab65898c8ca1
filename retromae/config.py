"""Plain YAML mapped onto dataclasses, with errors that name the file, the line and the key.

Every config section is a dataclass whose fields all have defaults and a one-line doc (the comment after the
field). Overrides on the command line use dotted keys: `train.lr=2e-5 objective.decoder_mask_ratio=0.5`.
A dataclass field typed as `dict` whose owner declares `_dynamic = {"field": resolver}` is typed later by the
resolver (used for the objective section, whose schema depends on its `name`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and what to do.

    `key`: the field at fault, when a `validate()` raises it, so that `build` can name its line."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false. YAML 1.1 also reads yes / no / on / off as booleans, so
    `mixed_precision: no` arrived as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# Where datasets live: recipes write `${RETROMAE_DATA}/beir/nfcorpus/corpus.jsonl`, and `retromae data get` puts
# datasets there. One setting for every recipe, suite and study; a clone has no ../shared.
DATA_ENV = "RETROMAE_DATA"
DEFAULT_DATA_ROOT = "data"  # relative to the folder a command runs in (the repository's root in the README)
_DATA_VARIABLE = re.compile(r"\$\{" + DATA_ENV + r"\}")


def data_root() -> Path:
    """The data root: $RETROMAE_DATA, else `data/` in the current folder."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT).expanduser()


def expand_data_root(node):
    """`${RETROMAE_DATA}` replaced by the data root in every string of a parsed YAML document (other `$` are left
    alone: prefixes and separators may hold them)."""
    if isinstance(node, str):
        return _DATA_VARIABLE.sub(lambda _: str(data_root()), node) if "${" in node else node
    if isinstance(node, list):
        return [expand_data_root(v) for v in node]
    if isinstance(node, dict):
        return {k: expand_data_root(v) for k, v in node.items()}
    return node


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path of a YAML document to its (1-based) line."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = path + (str(key_node.value),)
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def load_yaml(path: str | Path) -> tuple[dict, dict[tuple[str, ...], int]]:
    """Read a YAML mapping; return it with the line of every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections (model:, data:, ...)")
    return expand_data_root(data), _line_index(text)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], parsed value); values are read as YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=2e-5")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), expand_data_root(value)


def apply_overrides(data: dict, overrides: list[str], lines: dict | None = None) -> dict:
    """Apply dotted `key=value` overrides to `data`. If `lines` (a key path -> line map of the YAML file) is given,
    every overridden path is re-pointed at its override, so errors name the command line, not the file."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
        if lines is not None:
            path = tuple(keys)
            for known in [p for p in lines if p[: len(path)] == path]:
                del lines[known]
            lines[path] = f"command-line override {item!r}"
    return data


def _where(source: str, lines: dict, path: tuple[str, ...]) -> str:
    """'file:line' of a key, the override that set it, or the file."""
    line = lines.get(path)
    if isinstance(line, str):
        return line
    return f"{source}:{line}" if line else source


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str, key: str):
    """Check (and gently convert) a YAML value against a field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if tp is Any:
        return value
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = args[0] if args else Any
        coerced = [_coerce(v, inner, where, key) for v in items]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        raise AssertionError("nested dataclasses are built by build()")
    return value


def build(cls, data: dict | None, source: str = "<config>", lines: dict | None = None, path: tuple = ()):
    """Instantiate dataclass `cls` from a mapping, recursively; unknown keys are errors."""
    lines = lines or {}
    data = data or {}
    prefix = ".".join(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, lines, path)}: '{prefix}' must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dynamic = getattr(cls, "_dynamic", {})
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        full = f"{prefix}.{key}" if prefix else key
        where = _where(source, lines, path + (key,))
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{where}: unknown key '{full}'.{hint} Known keys{' in ' + prefix if prefix else ''}: {known}"
            )
        tp = hints[key]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if key in dynamic:
            kwargs[key] = dynamic[key](value, source, lines, path + (key,))
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, source, lines, path + (key,))
        elif inner is not None and dataclasses.is_dataclass(inner):  # a list of sections (e.g. a study's arms)
            if not isinstance(value, list):
                raise ConfigError(f"{where}: '{full}' must be a list")
            kwargs[key] = [build(inner, item, source, lines, path + (key, str(i))) for i, item in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, tp, where, full)
    for key in dynamic:
        if key not in kwargs:
            kwargs[key] = dynamic[key]({}, source, lines, path + (key,))
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            where = _where(source, lines, path + (err.key,)) if err.key else _where(source, {}, path)
            raise ConfigError(f"{where}: {err}") from None
    return obj


def to_dict(obj) -> dict:
    """A dataclass config back to plain data (for saving beside checkpoints and exports)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj, path: str | Path) -> None:
    from retromae.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def field_docs(cls) -> dict[str, str]:
    """The one-line doc of each field: the comment written after it in the source."""
    import inspect
    import re

    docs = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs
