"""The ``bench:`` block of a benchmark config, and the stage-2 config of each benchmark run.

A benchmark config (``configs/mixture/*.yaml``) is an ordinary stage-2 run config (identity first
stage, a Gaussian mixture as ``data``; ``ldm-smd train`` trains its base model as it is) with one
more block::

    bench:
      methods:                  # name -> overrides of model.params (merge_blocks)
        vanilla: {}
        smd_paper: {network: {target: ldm_smd.nn.smd.SMDNetwork, params: {...}}}
      T_list: [2, 5, 10]        # diffusion steps; each run samples with DDPM over all T
      seeds: [0, 1, 2]
      num_samples: 10000        # ... and the other keys of BENCH_KEYS

Run ``(method, T, seed)`` is :func:`run_config`: the base config with the method's overrides,
``model.params.schedule.params.num_timesteps = T`` and ``seed`` (which seeds the network's
initialisation, the training draws and the data; see :mod:`ldm_smd.rng`). :func:`validate_bench`
is registered with the config loader (:func:`ldm_smd.config.register_section`) when this module is
imported (the package's ``__init__`` imports it), so :func:`ldm_smd.config.validate_config` checks
the block, the model of every method and the config that the ``quick`` overrides make wherever a
benchmark config is loaded, before any work.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from ldm_smd.config import (
    ConfigError,
    apply_overrides,
    check_type,
    import_target,
    is_spec,
    register_section,
    signature_params,
    to_plain,
    type_name,
    validate_config,
    validate_spec,
)

#: the ``bench`` block: key -> (type, meaning)
BENCH_KEYS: dict[str, tuple[Any, str]] = {
    "methods": (dict, "name -> overrides of model.params (a target/params block replaces)"),
    "T_list": (list[int], "numbers of diffusion steps T, each at least 2"),
    "seeds": (list[int], "seeds; each run's `seed` (network init, training, data, sampling)"),
    "num_samples": (int, "samples drawn and scored per run"),
    "num_projections": (int, "random directions of the sliced Wasserstein distance"),
    "sample_batch": (int, "samples per sampler call"),
    "workers": (int, "runs trained at once, in separate processes"),
    "threads_per_worker": (int, "torch threads of each worker"),
    "references": (bool, "add the exact-posterior and best-Gaussian reference rows"),
    "quick": (list[str], "key.path=value overrides that --quick applies (a smoke run)"),
}
BENCH_DEFAULTS: dict[str, Any] = {
    "T_list": [2, 5, 10, 20, 50], "seeds": [0, 1, 2], "num_samples": 4000,
    "num_projections": 256, "sample_batch": 4000, "workers": 1, "threads_per_worker": 1,
    "references": True, "quick": [],
}
SCHEDULE_TARGET = "ldm_smd.diffusion.schedule.NoiseSchedule"


def bench_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``bench`` block with its defaults filled in."""
    return {**copy.deepcopy(BENCH_DEFAULTS), **to_plain(config.get("bench") or {})}


def run_config(config: Mapping[str, Any], method: str, T: int, seed: int) -> dict[str, Any]:
    """The ordinary stage-2 config of benchmark run ``(method, T, seed)`` (no ``bench`` block)."""
    run = {k: copy.deepcopy(v) for k, v in config.items() if k != "bench"}
    run["model"] = method_model(config, method)
    params = run["model"]["params"]
    params["schedule"] = schedule_block(params, T)
    params["seed"] = int(seed)
    run["seed"] = int(seed)
    data = run.get("data")
    if is_spec(data) and "seed" in signature_params(import_target(data["target"]))[0]:
        data["params"] = {**(data.get("params") or {}), "seed": int(seed)}
    return run


def schedule_block(model_params: Mapping[str, Any], T: int) -> dict[str, Any]:
    """The ``schedule`` block of ``model_params`` (or the default) with ``num_timesteps = T``."""
    schedule = dict(model_params.get("schedule") or {"target": SCHEDULE_TARGET})
    schedule["params"] = {**(schedule.get("params") or {}), "num_timesteps": int(T)}
    return schedule


def merge_blocks(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``: a mapping with a ``target`` replaces the block (so an
    SMD network does not inherit its backbone's params), another mapping merges key by key,
    anything else replaces."""
    if not isinstance(override, Mapping) or is_spec(override) or not isinstance(base, Mapping):
        return to_plain(override)
    out = dict(to_plain(base))
    for key, value in override.items():
        out[key] = merge_blocks(out[key], value) if key in out else to_plain(value)
    return out


def method_model(config: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The ``model`` block of benchmark method ``method``: ``bench.methods[method]`` laid over
    ``model.params``."""
    methods = (config.get("bench") or {}).get("methods") or {}
    if method not in methods:
        raise ConfigError(f"bench.methods: no method {method!r}; the config has: "
                          + ", ".join(methods))
    model = dict(config["model"])
    model["params"] = merge_blocks(model.get("params") or {}, methods[method] or {})
    return model


def validate_bench(config: Mapping[str, Any], *, source: str) -> None:
    """Check ``config['bench']``: its keys and types, the model of every method (as
    :func:`~ldm_smd.config.validate_spec` checks ``model``) and the whole config that its
    ``quick`` overrides make. Raises :class:`~ldm_smd.config.ConfigError` naming the key."""
    bench = config["bench"]
    if not isinstance(bench, Mapping):
        raise ConfigError(f"bench: expected a mapping, got {bench!r}")
    for key, value in bench.items():
        if key not in BENCH_KEYS:
            raise ConfigError(f"bench.{key}: unknown key; valid: {', '.join(sorted(BENCH_KEYS))}")
        if not check_type(value, BENCH_KEYS[key][0]):
            raise ConfigError(f"bench.{key}: expected {type_name(BENCH_KEYS[key][0])}, got "
                              f"{value!r}")
    if not bench.get("methods"):
        raise ConfigError("bench.methods: give at least one method (name: overrides of "
                          "model.params, {} for the base model)")
    if any(int(t) < 2 for t in bench.get("T_list", [])):
        raise ConfigError(f"bench.T_list: every T must be at least 2, got {bench['T_list']}")
    for key in ("num_samples", "num_projections", "sample_batch", "workers",
                "threads_per_worker"):
        if key in bench and int(bench[key]) < 1:
            raise ConfigError(f"bench.{key}: must be at least 1, got {bench[key]}")
    for name, overrides in bench["methods"].items():
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"bench.methods.{name}: expected a mapping of model.params "
                              f"overrides, got {overrides!r}")
        try:
            validate_spec(method_model(config, name), key="model")
        except ConfigError as exc:
            raise ConfigError(f"{source}: bench.methods.{name}: {exc}") from exc
    quick = list(bench.get("quick") or [])
    if quick:
        plain = {k: v for k, v in config.items() if k != "bench"}
        conf = OmegaConf.create(to_plain({**plain, "bench": {
            k: v for k, v in bench.items() if k != "quick"}}))
        try:
            validate_config(apply_overrides(conf, quick, source=source), source=source)
        except ConfigError as exc:
            raise ConfigError(f"{source}: bench.quick: {exc}") from exc


register_section("bench", validate=validate_bench,
                 summary="benchmark runs of this config: methods, T_list, seeds, ... (ldm-smd "
                         "bench)")
