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
that name the key and list the valid ones. :func:`instantiate` builds objects from ``target`` /
``params`` blocks; a nested block is built first unless the receiving parameter is annotated
``dict`` (then the receiver gets the spec and builds it itself).
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

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


#: Parameters given as a plain mapping (not a target/params block) whose entries are the keyword
#: arguments of another callable, which the receiving class builds itself. Their keys and value
#: types are checked against that callable's signature like a block's ``params``. The value is
#: ``(dotted path, excluded keys)``. Keyed by ``(target, parameter)``; validation only (building
#: is unchanged).
MAPPING_PARAMS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("ldm_smd.models.autoencoder.AutoencoderKL", "ddconfig"):
        ("ldm_smd.nn.autoencoder.Encoder", ()),
    ("ldm_smd.data.datamodule.ImageDataModule", "batch_augment"):
        ("ldm_smd.data.transforms.BatchAugment", ()),
}


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


# ----------------------------------------------------------------------------- targets


def import_target(target: str, *, key: str = "target") -> Any:
    """Import ``package.module.Name``; errors name the key and the dotted path."""
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}: {target!r} is not a dotted path like package.module.Class")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({exc})") from exc
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_") and n[0].isupper())
        raise ConfigError(
            f"{key}: module {module_name!r} has no {attr!r}; it defines: {', '.join(public)}"
        )
    return getattr(module, attr)


def is_spec(value: Any) -> bool:
    """True for a ``{target: ..., params: ...}`` block."""
    return isinstance(value, Mapping) and "target" in value


def signature_params(obj: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """``(parameters, type hints, takes **kwargs)`` of a class's constructor or a callable: the
    keyword parameters a config block may give it (``self`` and ``*args`` left out; the keys of a
    ``**options: Unpack[TypedDict]`` counted as parameters) and their annotations."""
    init = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(init)
    params = {
        name: p
        for name, p in sig.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable forward references: skip type checks, keep name checks
        hints = {}
    for name, p in sig.parameters.items():
        options = _unpacked(hints.get(name)) if p.kind == p.VAR_KEYWORD else None
        if options is not None:  # **options: Unpack[SomeTypedDict] names the keywords it takes
            takes_kwargs = False
            for key, annotation in typing.get_type_hints(options).items():
                required = key in getattr(options, "__required_keys__", ())
                params[key] = inspect.Parameter(
                    key, inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if required else None,
                )
                hints[key] = annotation
    return params, hints, takes_kwargs


def _unpacked(annotation: Any) -> Any:
    """The TypedDict of a ``**kwargs: Unpack[TypedDict]`` annotation, else ``None``."""
    if annotation is None or getattr(typing.get_origin(annotation), "_name", None) != "Unpack":
        return None
    (inner,) = typing.get_args(annotation)
    return inner if typing.is_typeddict(inner) else None


def type_name(annotation: Any) -> str:
    """An annotation as an error message shows it: ``int``, ``list[int]``, ``'a' | 'b'``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(v) for v in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_type(value: Any, annotation: Any) -> bool:
    """Does a YAML value fit a constructor annotation? Unknown annotations accept anything."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if annotation is Path:
        return isinstance(value, str | Path)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(check_type, value, args))
        inner = args[0] if args else Any
        return all(check_type(v, inner) for v in value)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(annotation, type):
        # a class-typed parameter (e.g. an nn.Module) is given as a target/params block
        return isinstance(value, annotation) or is_spec(value)
    return True


def validate_spec(spec: Any, *, key: str) -> None:
    """Check one ``target`` / ``params`` block and every block nested in it."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected a mapping with 'target' and 'params', got {spec!r}")
    extra = set(spec) - {"target", "params"}
    if extra:
        raise ConfigError(
            f"{key}: unknown key(s) {sorted(extra)}; a block has only 'target' and 'params'"
        )
    if "target" not in spec:
        raise ConfigError(f"{key}: missing 'target' (a dotted path like package.module.Class)")
    obj = import_target(spec["target"], key=f"{key}.target")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{key}.params: expected a mapping, got {params!r}")
    accepted = check_arguments(params, obj, key=f"{key}.params", label=spec["target"],
                               noun="parameter")
    for name, value in params.items():
        pkey = f"{key}.params.{name}"
        if name not in accepted:
            continue  # taken by **kwargs
        if is_spec(value):
            validate_spec(value, key=pkey)
        elif isinstance(value, Mapping):
            schema = MAPPING_PARAMS.get((spec["target"], name))
            if schema is not None:
                validate_mapping(value, key=pkey, schema=schema)
            for sub, subvalue in value.items():
                if is_spec(subvalue):
                    validate_spec(subvalue, key=f"{pkey}.{sub}")
    missing = [
        n
        for n, p in accepted.items()
        if p.default is inspect.Parameter.empty and n not in params
    ]
    if missing:
        raise ConfigError(
            f"{key}.params: missing required parameter(s) {missing} of {spec['target']}"
        )
    check = getattr(obj, "check_config", None)  # what a signature cannot say (a class's own)
    if callable(check):
        check(params, key=key)


def validate_mapping(
    value: Mapping[str, Any], *, key: str, schema: tuple[str, tuple[str, ...]]
) -> None:
    """Check a plain-mapping parameter (see :data:`MAPPING_PARAMS`) against its callable."""
    path, excluded = schema
    target = import_target(path, key=f"{key} (schema)")
    check_arguments(dict(value), target, key=key, label=path, excluded=excluded)


def check_arguments(
    values: Mapping[str, Any], target: Any, *, key: str, label: str,
    excluded: Sequence[str] = (), noun: str = "key",
) -> dict[str, inspect.Parameter]:
    """Every entry of ``values`` is a keyword argument of ``target`` of the annotated type (an
    unknown one is an "unknown ``noun``" error, unless ``target`` takes ``**kwargs``); returns
    ``target``'s accepted keyword parameters."""
    accepted, hints, takes_kwargs = signature_params(target)
    accepted = {n: p for n, p in accepted.items() if n not in excluded}
    valid = ", ".join(sorted(accepted)) or "(none)"
    for name, item in values.items():
        if name not in accepted:
            if takes_kwargs:
                continue
            raise ConfigError(f"{key}.{name}: unknown {noun} of {label}; valid: {valid}")
        annotation = hints.get(name, inspect.Parameter.empty)
        if not check_type(item, annotation):
            raise ConfigError(
                f"{key}.{name}: expected {type_name(annotation)}, got {type(item).__name__} "
                f"{item!r}"
            )
    return accepted


def check_keys(section: Any, allowed: Mapping[str, Any], *, key: str) -> None:
    """``section`` maps keys of ``allowed`` to values of their annotations; else a
    :class:`ConfigError` naming ``key.entry`` (and the valid keys)."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {section!r}")
    for name, value in section.items():
        if name not in allowed:
            raise ConfigError(f"{key}.{name}: unknown key; valid: {', '.join(sorted(allowed))}")
        if not check_type(value, allowed[name]):
            raise ConfigError(f"{key}.{name}: expected {type_name(allowed[name])}, got {value!r}")


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


def instantiate(spec: Mapping[str, Any], **extra: Any) -> Any:
    """Build ``target(**params, **extra)``.

    A nested ``target`` / ``params`` block is built first, unless the receiving parameter is
    annotated ``dict`` (the receiver then builds it itself, e.g. a Lightning module that keeps
    its hyper-parameters as plain data).
    """
    if not is_spec(spec):
        raise ConfigError(f"instantiate: expected a block with 'target', got {spec!r}")
    obj = import_target(spec["target"])
    params = dict(spec.get("params") or {})
    _, hints, _ = signature_params(obj)
    for name, value in params.items():
        if is_spec(value) and not _wants_dict(hints.get(name)):
            params[name] = instantiate(value)
    return obj(**params, **extra)


def _wants_dict(annotation: Any) -> bool:
    if annotation is None:
        return False
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union,
        types.UnionType,
    ) else (annotation,)
    return any(c in (dict, Mapping) or typing.get_origin(c) in (dict, Mapping) for c in candidates)
