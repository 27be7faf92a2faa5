"""Reading and writing a `RunConfig`: dataclass defaults < YAML file < `--set key=value`.

The file and the overrides are merged into one plain tree first; the dataclasses are then
built from that tree, so their own `__post_init__` checks see the final values. Keys are
checked against the dataclass fields at every level, and every error names the dotted key.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Optional

import yaml

from mos.lab.config import RunConfig
from mos.lab.moved_options import migrate, moved_key, removed_key

_PACKAGE_CONFIGS = Path(__file__).parent / "configs"
_CHECKOUT_CONFIGS = Path(__file__).parents[2] / "configs"


def load_run_config(path: Optional[str], overrides: list[str], base: Optional[dict] = None) -> RunConfig:
    """The run config from the defaults, then the YAML file at `path` (if any; a shipped config's
    name such as "default" also works) or the config tree `base` (a checkpoint's), then `overrides`."""
    if base is not None:
        # A checkpoint written before an option moved keeps the old key: move it, not refuse it.
        tree, where = migrate(copy.deepcopy(base)), "the checkpoint's configuration"
    else:
        path = config_path(path) if path else None
        tree, where = (_read_yaml(path) if path else {}), f"config file {path}"
    _check_keys(RunConfig, tree, "", where)
    for text in overrides:
        key, value = parse_override(text)
        section = _check_path(RunConfig, key, f"--set {text}")
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            _check_keys(section, value, f"{key}.", f"--set {text}")
        _set_dotted(tree, key, value)
    run_cfg = _build(RunConfig, tree, "")
    _check_model_options(run_cfg)
    return run_cfg


def _check_model_options(run_cfg: RunConfig) -> None:
    """profile.per_model's and profile.grid's option sets name real keys with valid values: found
    now (and by --print-config), not when the profile reaches that model."""
    per_model = run_cfg.profile.per_model
    for name, options in per_model.items():
        with_options(run_cfg, options, f"profile.per_model.{name}")
    for name, option_sets in run_cfg.profile.grid.items():
        for index, option_set in enumerate(option_sets):
            # A grid's set runs over the model's per_model options (mos.lab.profiling.study).
            with_options(run_cfg, {**per_model.get(name, {}), **option_set}, f"profile.grid.{name}[{index}]")


def with_options(run_cfg: RunConfig, options: dict, where: str) -> RunConfig:
    """`run_cfg` with `options` ({dotted key: value}, as `--set` gives them) applied and every
    section's checks run again; an error names `where` and the key."""
    tree = config_to_dict(run_cfg)
    for key, value in options.items():
        _check_path(RunConfig, key, f"{where}: {key}")
        _set_dotted(tree, key, value)
    try:
        return _build(RunConfig, tree, "")
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from err


def shipped_configs() -> dict:
    """Name -> path of the configs that come with the package: copied into `mos/lab/configs/` when a
    wheel is built (setup.py), read from the checkout's `configs/` in a source tree or an editable
    install."""
    folder = _PACKAGE_CONFIGS if _PACKAGE_CONFIGS.is_dir() else _CHECKOUT_CONFIGS
    return {file.stem: file for file in sorted(folder.glob("*.yaml"))}


def config_path(given: str) -> str:
    """`given` when that file exists; else the shipped config it names: "default", "default.yaml"
    or "configs/default.yaml" run from another directory. An unknown name is an error that lists them."""
    if os.path.isfile(given):
        return given
    name = Path(given)
    if name.parent in (Path("."), Path("configs")) and name.suffix in ("", ".yaml"):
        shipped = shipped_configs().get(name.stem)
        if shipped is not None:
            return str(shipped)
    raise FileNotFoundError(f"--config: expected a YAML file or the name of a shipped config "
                            f"({', '.join(shipped_configs()) or 'none found'}), got {given!r} (no such file)")


def parse_override(text: str) -> tuple[str, object]:
    """`"a.b=value"` -> `("a.b", yaml value)`: `3` is an int, `[0,1]` a list, `null` None."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: expected key=value with a dotted key, e.g. train.lr=0.001")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {text!r}: the value is not valid YAML ({_one_line(err)})") from None
    return key, value


def config_to_dict(cfg) -> dict:
    """A JSON/YAML-ready dict of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (`seeds: [0, 1, 2]`), as a person writes the file."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def dump_yaml(cfg) -> str:
    """The config as YAML in field order; `load_run_config` reads it back to an equal config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key that repeats in one mapping: PyYAML keeps the last silently, so a
    second `train:` section would drop the first's options without a word."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":       # `<<: *anchor`, flattened by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, collections.abc.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeats the one on line {seen[key] + 1}", key_node.start_mark)
            if isinstance(key, collections.abc.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as stream:
        try:
            tree = yaml.load(stream, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path}: not valid YAML ({_one_line(err)})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"config file {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                             f"{err.start}); save it as UTF-8") from None
    if tree is None:  # an empty file keeps every default
        return {}
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _sections(cls) -> dict:
    """Field name -> resolved type (the config module uses postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, cls, where: str) -> ValueError:
    new = moved_key(key)
    if new is not None:
        return ValueError(f"{where}: '{key}' moved to '{new}'")
    if removed_key(key) is not None:
        return ValueError(f"{where}: '{key}' was removed: {removed_key(key)}")
    level = key.rpartition(".")[0]
    scope = f"under '{level}'" if level else "at the top level"
    valid = ", ".join(_sections(cls))
    return ValueError(f"{where}: unknown key '{key}'; valid keys {scope}: {valid}")


def _check_keys(cls, tree: dict, prefix: str, where: str) -> None:
    """Every key of the file's tree names a field, at every level."""
    hints = _sections(cls)
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if name not in hints:
            # A section of an earlier layout: name where its first moved key lives now.
            inner = [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else []
            raise _unknown_key(next((k for k in inner if moved_key(k)), key), cls, where)
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            _check_keys(hints[name], value, f"{key}.", where)


def _check_path(cls, key: str, where: str):
    """A dotted override key names a field; every part but the last names a section.
    Returns the field's type."""
    if moved_key(key) is not None:
        raise _unknown_key(key, cls, where)
    parts = key.split(".")
    for depth, name in enumerate(parts):
        hints = _sections(cls)
        dotted = ".".join(parts[: depth + 1])
        if name not in hints:
            raise _unknown_key(dotted, cls, where)
        cls = hints[name]
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ValueError(f"{where}: '{dotted}' is a value, not a section, so '{key}' does not exist")
    return cls


def _set_dotted(tree: dict, key: str, value) -> None:
    *sections, leaf = key.split(".")
    node = tree
    for depth, name in enumerate(sections):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            dotted = ".".join(sections[: depth + 1])
            raise TypeError(f"{dotted}: expected a mapping of its fields, got {child!r}")
        node = child
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        # `--set model.mos={top_k: 2}` updates the file's section instead of replacing it. A
        # dotted name inside is one key (profile.per_model's options: `model.item_id_dim`).
        for name, item in value.items():
            if "." in str(name):
                node[leaf][name] = item
            else:
                _set_dotted(node[leaf], name, item)
    else:
        node[leaf] = value


def _build(cls, tree: dict, prefix: str):
    """The dataclass from a tree whose keys were already checked; absent fields keep defaults."""
    kwargs = {}
    for name, hint in _sections(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            section = tree.get(name)
            if section is None:  # `model:` with every child commented out keeps the defaults
                section = {}
            if not isinstance(section, dict):
                raise TypeError(f"{key}: expected a mapping of {hint.__name__} fields, got {section!r}")
            kwargs[name] = _build(hint, section, f"{key}.")
        elif name in tree:
            kwargs[name] = _coerce(key, hint, tree[name])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise type(err)(_dotted_message(str(err), cls, prefix)) from err


def _dotted_message(message: str, cls, prefix: str) -> str:
    """`__post_init__` of a nested section names fields by class (`MoSConfig.fusion`); the user
    typed the dotted path (`model.mos.fusion`), so name it that way."""
    own = f"{cls.__name__}."
    if prefix and message.startswith(own):
        return prefix + message[len(own):]
    return message


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", tuple: "a list",
               dict: "a mapping"}


def _coerce(key: str, hint, value):
    """`value` as the field's type: ints are accepted for floats, lists become tuples."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is float and isinstance(value, str):
        # PyYAML reads `3e-4` (no dot) as a string; for a float field that is plainly a number.
        try:
            return _finite(key, float(value))
        except ValueError as err:
            if str(err).startswith(key):
                raise
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(key, float(value))
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    elif hint in (str, bool, dict) and type(value) is hint:
        return value
    expected = _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))
    if optional:
        expected += " or null"
    raise TypeError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def _finite(key: str, value: float) -> float:
    """No option is a NaN or an infinity: each would reach a loss, a weight or a size as NaN (an
    infinite weight decay makes every weight NaN after one step, and the error names train.lr)."""
    if not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return value


def _plain(value):
    if isinstance(value, dict):
        return {name: _plain(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
