"""Config files: ml-collections Python files (``get_config()``) or reference YAML files,
with ``key.path=value`` overrides from the command line.

Loaded configs are locked: an override naming a key the config does not have is an
error, not a silently added field.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterable
from typing import Any

import ml_collections
import yaml

from starflow_jax.config.model_config import ConfigError, ModelConfig
from starflow_jax.config.reference_args import (
    from_model_kwargs,
    model_config_from_train_args,
    read_yaml_arguments,
    train_args,
)


def model_section(**values: Any) -> ml_collections.ConfigDict:
    """A ``config.model`` section holding every ModelConfig field (defaults filled in)."""
    base = {f: getattr(ModelConfig, f) for f in ModelConfig.field_names() if hasattr(ModelConfig, f)}
    unknown = sorted(set(values) - set(ModelConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown model config keys: {unknown}")
    base.update(values)
    if "layers_per_block" in base:
        base["layers_per_block"] = tuple(base["layers_per_block"])
    return ml_collections.ConfigDict(base, type_safe=False)


def _load_python(path: pathlib.Path, arg: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"starflow_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config(arg) if arg is not None else module.get_config()


def _load_reference_yaml(path: pathlib.Path) -> ml_collections.ConfigDict:
    args = read_yaml_arguments(path)
    model = model_config_from_train_args(args)
    config = ml_collections.ConfigDict(type_safe=False)
    config.name = path.stem
    config.model = model_section(**model.to_dict())
    config.reference = ml_collections.ConfigDict(
        {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in train_args(args).items()}, type_safe=False
    )
    return config


def _load_model_kwargs_json(path: pathlib.Path) -> ml_collections.ConfigDict:
    """A JSON object of the reference ``Model(**kwargs)`` arguments (e.g. a case's
    ``meta.model_kwargs``), or ``{"model_kwargs": {...}}``."""
    import json

    data = json.loads(path.read_text())
    if isinstance(data, dict) and "model_kwargs" in data:
        data = data["model_kwargs"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of reference Model arguments")
    config = ml_collections.ConfigDict(type_safe=False)
    config.name = path.stem
    config.model = model_section(**from_model_kwargs(data).to_dict())
    return config


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"3e-4"`` -> 0.0003, ``"true"`` -> True, ``"[2, 2]"`` -> [2, 2],
    ``"none"``/``"null"`` -> None, else the string. Numbers are read as Python reads them
    (YAML 1.1 would read ``3e-4``, without a dot, as a string)."""
    if text.lower() == "none":
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the value {text!r}: {str(e).splitlines()[0]}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for i, p in enumerate(parts[:-1]):
            if p not in node:
                raise ConfigError(f"override {key!r}: config has no key {'.'.join(parts[: i + 1])!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(
                f"override {key!r}: config has no key {key!r} (keys at that level: {sorted(node.keys())})"
            )
        old = node[parts[-1]]
        # a text setting takes the text as written (YAML would read "81:16" as the number 4876)
        value = text if isinstance(old, str) and text.lower() not in ("none", "null") else parse_value(text)
        if isinstance(value, list):
            value = tuple(value)
        with node.unlocked():
            try:
                node[parts[-1]] = value
            except TypeError:
                raise ConfigError(
                    f"override {key}={text}: {key} is of type {type(old).__name__} (now {old!r}), got {value!r}"
                ) from None
    return config


def load_config(path: str | pathlib.Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path`` (``file.py`` or ``file.py:arg`` with ``get_config(arg)``; a reference
    ``.yaml``; a ``.json`` of reference ``Model`` kwargs), lock it and apply ``overrides``."""
    text = str(path)
    arg = None
    if ":" in text and not pathlib.Path(text).exists():
        text, arg = text.rsplit(":", 1)
    p = pathlib.Path(text)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix in (".yaml", ".yml"):
        config = _load_reference_yaml(p)
    elif p.suffix == ".py":
        config = _load_python(p, arg)
    elif p.suffix == ".json":
        config = _load_model_kwargs_json(p)
    else:
        raise ConfigError(
            f"config file {p}: expected a .py (ml-collections), .yaml (reference YAML) or "
            ".json (reference Model kwargs) file"
        )
    if "model" not in config:
        raise ConfigError(f"config {p} has no 'model' section")
    config.lock()
    apply_overrides(config, overrides)
    model_config(config)  # validate now, with the overrides applied
    return config


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a loaded config (unknown keys in ``model`` are an error)."""
    values = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    return ModelConfig.from_dict(values)
