"""Experiment configs: CompVis-style YAML with ``target`` / ``params`` blocks.

A config file has these top-level sections::

    seed: 0                     # every random draw of the run derives from it
    run_dir: runs/NAME          # checkpoints, logs, samples and the resolved config go here
    model:   {target: dotted.path.Class, params: {...}}
    data:    {target: dotted.path.Class, params: {...}}
    trainer: {...}              # keyword arguments of lightning.Trainer
    checkpoint: {every_n_train_steps: 500, save_top_k: 1}
    logging: {tensorboard: true, csv: true}
    bench: {methods: {NAME: {...}}, T_list: [...], seeds: [...], ...}   # benchmark configs only

Other modules add sections with :func:`register_section` (this one imports none of them): the
``bench:`` block of a benchmark config is :mod:`ldm_smd.bench.spec`'s, checked by every loader.

:func:`load_config` reads a file and applies overrides: ``a.b.c=value`` sets a key (a mapping
value replaces the whole block), ``~a.b.c`` deletes one; :func:`validate_config`
checks the whole tree before any work starts: unknown keys and wrongly typed values are errors
that name the key and list the valid ones. Each ``target`` / ``params`` block is checked and built
by :mod:`ldm_smd.blocks` (:func:`~ldm_smd.blocks.instantiate`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm_smd.blocks import check_arguments, check_keys, check_type, validate_spec
from ldm_smd.errors import ConfigError  # defined with the other named errors, used from here

TOP_LEVEL_KEYS = {
    "seed": "integer seed of the run",
    "run_dir": "folder for checkpoints, logs and samples",
    "model": "target/params block of the LightningModule",
    "data": "target/params block of the LightningDataModule",
    "trainer": "keyword arguments of lightning.Trainer",
    "checkpoint": "checkpointing: every_n_train_steps, save_top_k",
    "logging": "loggers (tensorboard, csv: bool) and sample grids (sample_every_n_steps, sample_n)",
    "nan_guard": "non-finite loss or gradient: action (stop | skip), max_skips",
}
#: lightning.Trainer arguments that train.py sets itself (from the run_dir and the other blocks)
TRAINER_SET_BY_US = ("default_root_dir", "logger", "callbacks", "plugins")
CHECKPOINT_KEYS = {"every_n_train_steps": int, "save_top_k": int}
LOGGING_KEYS = {"tensorboard": bool, "csv": bool, "sample_every_n_steps": int, "sample_n": int}
NAN_GUARD_KEYS = {"action": str, "max_skips": int}


#: the sections other modules add to the language, by name: ``(summary, validate)``, where
#: ``validate(config, source=...)`` checks the section against the whole ``config`` and raises
#: :class:`ConfigError` naming the key; :func:`validate_config` calls it when the section is there
SECTIONS: dict[str, tuple[str, Callable[..., None]]] = {}


def register_section(name: str, *, summary: str, validate: Callable[..., None]) -> None:
    """Add the top-level section ``name`` (see :data:`SECTIONS`). Its module calls this when
    imported (``ldm_smd.bench.spec`` adds ``bench``; the package's ``__init__`` imports it), so
    every loader knows it while this module imports none of them."""
    if name in TOP_LEVEL_KEYS:
        raise ValueError(f"register_section: {name!r} is a built-in section of the config")
    SECTIONS[name] = (summary, validate)



_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


# ----------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; people mean a number
    return key, value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML config, apply ``key.path=value`` overrides and validate it.

    Returns a plain nested dict (no OmegaConf objects), so it can be saved in checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        conf = OmegaConf.load(path)
    except Exception as exc:  # omegaconf raises several parser error types
        raise ConfigError(f"config file {path} could not be parsed: {exc}") from exc
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    config = apply_overrides(conf, overrides, source=str(path))
    validate_config(config, source=str(path))
    return config


def apply_overrides(conf: DictConfig, overrides: Sequence[str], *, source: str) -> dict:
    """Apply ``key=value`` / ``~key`` overrides to ``conf``; return the resolved plain dict."""
    for item in overrides:
        if item.startswith("~"):
            _delete(conf, item[1:], source=source)
            continue
        key, value = _parse_override(item)
        OmegaConf.update(conf, key, value, merge=False, force_add=True)
    try:
        config = OmegaConf.to_container(conf, resolve=True)
    except Exception as exc:  # omegaconf raises several interpolation error types
        raise ConfigError(f"{source}: {exc}") from exc
    assert isinstance(config, dict)
    return config


def _delete(conf: DictConfig, key: str, *, source: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(conf, parent_key) if parent_key else conf
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"override ~{key}: {source} has no key {key!r} to delete")
    del parent[leaf]


def to_plain(obj: Any) -> Any:
    """Convert OmegaConf containers (and tuples) into plain dicts and lists."""
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


def save_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved config as YAML (to a temporary name, then renamed)."""
    from ldm_smd.fileio import atomic_write

    text = yaml.safe_dump(to_plain(config), sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text.encode()))


# ----------------------------------------------------------------------------- validation


def check_seeds(config: Any, key: str = "") -> None:
    """Every integer ``seed`` key of the tree is in the range seeds take
    (:data:`ldm_smd.rng.SEED_MAX`); raises :class:`ConfigError` naming the key."""
    from ldm_smd.rng import seed_problem  # torch: only when a config is validated

    items = config.items() if isinstance(config, Mapping) else enumerate(
        config if isinstance(config, list) else ())
    for name, value in items:
        path = f"{key}.{name}" if key else str(name)
        if name == "seed" and isinstance(value, int) and (problem := seed_problem(value)):
            raise ConfigError(f"{path}: {problem}")
        check_seeds(value, path)


def validate_config(config: Mapping[str, Any], *, source: str = "config") -> None:
    """Validate a whole run config; raises :class:`ConfigError` naming the first bad key."""
    valid = {*TOP_LEVEL_KEYS, *SECTIONS}
    unknown = set(config) - valid
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; valid: "
            + ", ".join(sorted(valid))
        )
    if "model" not in config:
        raise ConfigError(f"{source}: missing the 'model' block")
    if "seed" in config and not check_type(config["seed"], int):
        raise ConfigError(f"seed: expected int, got {config['seed']!r}")
    check_seeds(config)
    if "run_dir" in config and not isinstance(config["run_dir"], str):
        raise ConfigError(f"run_dir: expected a path string, got {config['run_dir']!r}")
    validate_spec(config["model"], key="model")
    if "data" in config and config["data"] is not None:
        validate_spec(config["data"], key="data")
    trainer = config.get("trainer") or {}
    if not isinstance(trainer, Mapping):
        raise ConfigError(f"trainer: expected a mapping, got {trainer!r}")
    if trainer:
        from lightning import Trainer

        ours = sorted(set(trainer) & set(TRAINER_SET_BY_US))
        if ours:
            raise ConfigError(
                f"trainer.{ours[0]}: set by ldm-smd itself (from run_dir and the checkpoint and "
                "logging blocks); remove it from the trainer block"
            )
        check_arguments(trainer, Trainer, key="trainer", label="lightning.Trainer",
                        excluded=TRAINER_SET_BY_US)
    for name, allowed in (("checkpoint", CHECKPOINT_KEYS), ("logging", LOGGING_KEYS),
                          ("nan_guard", NAN_GUARD_KEYS)):
        if config.get(name) is not None:
            check_keys(config[name], allowed, key=name)
    action = (config.get("nan_guard") or {}).get("action", "stop")
    if action not in ("stop", "skip"):
        raise ConfigError(f"nan_guard.action: {action!r} is not one of: stop, skip")
    for name, (_, validate) in SECTIONS.items():
        if config.get(name) is not None:
            validate(config, source=source)
