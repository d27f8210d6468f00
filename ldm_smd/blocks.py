"""``target`` / ``params`` blocks, the unit of a config: importing a block's target, checking a
block against its target's signature (unknown keys, missing parameters and wrongly typed values are
errors that name the key and list the valid ones), and building it.

:func:`instantiate` builds a nested block first unless the receiving parameter is annotated
``dict`` (the receiver then gets the spec and builds it itself). The loader of whole configs, their
top-level sections and overrides is :mod:`ldm_smd.config`.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm_smd.errors import ConfigError

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
