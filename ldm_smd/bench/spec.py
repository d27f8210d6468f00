"""The ``bench:`` block of a benchmark config, and the stage-2 config of each benchmark run.

A benchmark config (``configs/mixture/*.yaml``, ``configs/bench/*.yaml``) is an ordinary stage-2 run
config (``ldm-smd train`` trains its base model as it is) with one more block::

    bench:
      methods:                  # name -> overrides of model.params (merge_blocks)
        vanilla: {}
        smd_paper: {network: {target: ldm_smd.nn.smd.SMDNetwork, params: {...}}}
      T_list: [2, 5, 10]        # diffusion steps; each run samples with its sampler over all T
      seeds: [0, 1, 2]
      num_samples: 10000        # samples drawn and scored per run
      scorer: {target: ldm_smd.bench.scorers.ImageScores, params: {data: data/mnist5k}}
      fast_samplers:            # rows of one vanilla model per seed trained at T = base_T ...
        base_T: 1000            # ... sampled with these samplers at steps = each T of T_list
        samplers: {ddim: {kind: ddim, spacing: trailing}, dpmpp: {kind: dpmpp, spacing: trailing}}
      first_stage: {config: configs/autoencoder/mnist5k-kl-f4.yaml, max_steps: 3000}
      score_steps: [500, 1000]  # also score each run at these training steps
      # ... and the other keys of BENCH_KEYS

Run ``(method, T, seed)`` is :func:`run_config`: the base config with the method's overrides,
``model.params.schedule.params.num_timesteps = T`` and ``seed`` (which seeds the network's
initialisation, the training draws and the data; see :mod:`ldm_smd.rng`). The scorer is the
benchmark's kind of data (:mod:`ldm_smd.bench.scorers`): without a ``scorer`` a config whose data
is a Gaussian mixture is scored against it (:func:`scorer_spec`). :func:`validate_bench` is
registered with the config loader (:func:`ldm_smd.config.register_section`) when this module is
imported (the package's ``__init__`` imports it), so :func:`ldm_smd.config.validate_config` checks
the block, the model of every method, the scorer, the first stage's config and the config that the
``quick`` overrides make wherever a benchmark config is loaded, before any work.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from ldm_smd.blocks import (
    check_arguments,
    check_keys,
    import_target,
    is_spec,
    signature_params,
    validate_spec,
)
from ldm_smd.config import (
    ConfigError,
    apply_overrides,
    load_config,
    register_section,
    to_plain,
    validate_config,
)

#: the ``bench`` block: key -> (type, meaning)
BENCH_KEYS: dict[str, tuple[Any, str]] = {
    "methods": (dict, "name -> overrides of model.params (a target/params block replaces)"),
    "T_list": (list[int], "numbers of diffusion steps T, each at least 2"),
    "seeds": (list[int], "seeds; each run's `seed` (network init, training, data, sampling)"),
    "num_samples": (int, "samples drawn and scored per run"),
    "sample_batch": (int, "samples per sampler call"),
    "scorer": (dict, "target/params block of the scorer (ldm_smd.bench.scorers); default: the "
                     "mixture scorer where the data is a Gaussian mixture"),
    "fast_samplers": (dict, "base_T, method, samplers: rows of one model per seed trained at "
                            "T = base_T and sampled with few steps (FAST_SAMPLER_KEYS)"),
    "first_stage": (dict, "config, max_steps, ...: the autoencoder trained once for every run "
                          "(FIRST_STAGE_KEYS)"),
    "score_steps": (list[int], "training steps at which each trained run (not a fast "
                               "sampler's base model) is also scored"),
    "workers": (int, "runs trained at once, in separate processes"),
    "threads_per_worker": (int, "torch threads of each worker"),
    "references": (bool, "add the scorer's reference rows (no training)"),
    "quick": (list[str], "key.path=value overrides that --quick applies (a smoke run)"),
}
BENCH_DEFAULTS: dict[str, Any] = {
    "T_list": [2, 5, 10, 20, 50], "seeds": [0, 1, 2], "num_samples": 4000,
    "sample_batch": 4000, "scorer": None, "fast_samplers": None, "first_stage": None,
    "score_steps": [], "workers": 1, "threads_per_worker": 1, "references": True, "quick": [],
}
#: ``bench.fast_samplers``: key -> (type, meaning)
FAST_SAMPLER_KEYS: dict[str, tuple[Any, str]] = {
    "base_T": (int, "T of the one model per seed the fast samplers sample (at least max T_list)"),
    "method": (str, "the method of bench.methods that model is (default: vanilla)"),
    "samplers": (dict, "row name -> Sampler options but steps (kind, spacing, ddim_eta); steps "
                       "= each T of T_list"),
}
#: ``bench.first_stage``: key -> (type, meaning)
FIRST_STAGE_KEYS: dict[str, tuple[Any, str]] = {
    "config": (str, "the stage-1 (autoencoder) config, trained on the benchmark's data"),
    "max_steps": (int, "its trainer.max_steps"),
    "batch_size": (int, "its batch size (default: the autoencoder config's)"),
    "overrides": (list[str], "more key.path=value overrides of the autoencoder config"),
    "scale_batches": (int, "batches of data for the latent scale factor (default 8)"),
}
MIXTURE_SCORER = "ldm_smd.bench.scorers.MixtureScorer"
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


def scorer_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The scorer block of a benchmark: ``bench.scorer``, else, where the data is a Gaussian
    mixture (``data.params.mixture``), the mixture scorer over it with its defaults."""
    bench = config.get("bench") or {}
    if bench.get("scorer") is not None:
        return to_plain(bench["scorer"])
    mixture = ((config.get("data") or {}).get("params") or {}).get("mixture")
    if mixture is None:
        raise ConfigError("bench.scorer: give the scorer of this benchmark's data (a "
                          "target/params block, e.g. ldm_smd.bench.scorers.ImageScores); only "
                          "a Gaussian mixture as data (data.params.mixture) has a default")
    return {"target": MIXTURE_SCORER, "params": {"mixture": to_plain(mixture)}}


def fast_samplers(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``bench.fast_samplers`` with its defaults filled in (``method: vanilla``), or ``None``."""
    block = (config.get("bench") or {}).get("fast_samplers")
    if block is None:
        return None
    return {"method": "vanilla", **to_plain(block)}


def first_stage_overrides(config: Mapping[str, Any]) -> list[str]:
    """The overrides that make ``bench.first_stage.config`` the benchmark's first stage: its
    ``trainer.max_steps``, ``batch_size`` and own ``overrides`` (its data block is replaced by the
    benchmark's by the runner)."""
    block = (config.get("bench") or {}).get("first_stage") or {}
    out = [f"trainer.max_steps={int(block['max_steps'])}"] if "max_steps" in block else []
    return out + list(block.get("overrides") or [])


def checked_seeds(seeds: Any, *, key: str) -> list[int]:
    """``seeds`` as ints, each a seed a run takes (:func:`ldm_smd.rng.seed_problem`), none
    twice; else a :class:`ConfigError` naming ``key`` (``bench.seeds`` or ``--seeds``)."""
    from ldm_smd.rng import seed_problem  # torch: only when a benchmark is checked

    values = list(seeds)
    for seed in values:
        if problem := seed_problem(seed):
            raise ConfigError(f"{key}: {problem}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: {values} names a seed twice")
    return [int(s) for s in values]


def _types(schema: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    return {name: annotation for name, (annotation, _) in schema.items()}


def _validate_fast_samplers(config: Mapping[str, Any]) -> None:
    from ldm_smd.diffusion.samplers import Sampler

    bench = config["bench"]
    block = bench["fast_samplers"]
    check_keys(block, _types(FAST_SAMPLER_KEYS), key="bench.fast_samplers")
    key = "bench.fast_samplers"
    if "base_T" not in block or not block.get("samplers"):
        raise ConfigError(f"{key}: give base_T (the T the one model is trained at) and samplers "
                          "(row name -> kind, spacing, ddim_eta)")
    T_max = max(bench.get("T_list") or BENCH_DEFAULTS["T_list"])
    if int(block["base_T"]) < T_max:
        raise ConfigError(f"{key}.base_T: {block['base_T']} is less than the largest T of "
                          f"T_list ({T_max}); the fast samplers take T steps of it")
    method = block.get("method", "vanilla")
    if method not in bench["methods"]:
        raise ConfigError(f"{key}.method: {method!r} is not in bench.methods "
                          f"({', '.join(bench['methods'])})")
    for name, options in block["samplers"].items():
        if name in bench["methods"]:
            raise ConfigError(f"{key}.samplers.{name}: a method of bench.methods has this name; "
                              "rows need names of their own")
        if not isinstance(options, Mapping):
            raise ConfigError(f"{key}.samplers.{name}: expected a mapping of Sampler options "
                              f"(kind, spacing, ddim_eta), got {options!r}")
        check_arguments(options, Sampler, key=f"{key}.samplers.{name}", label="Sampler",
                        excluded=("steps",))


def _validate_first_stage(config: Mapping[str, Any], *, source: str) -> None:
    block = config["bench"]["first_stage"]
    key = "bench.first_stage"
    check_keys(block, _types(FIRST_STAGE_KEYS), key=key)
    if "config" not in block:
        raise ConfigError(f"{key}.config: give the autoencoder config trained once for the "
                          "benchmark")
    for name in ("max_steps", "batch_size", "scale_batches"):
        if name in block and int(block[name]) < 1:
            raise ConfigError(f"{key}.{name}: must be at least 1, got {block[name]}")
    try:
        load_config(block["config"], first_stage_overrides(config))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {key}.config: {exc}") from exc
    if ((config["model"].get("params") or {}).get("first_stage") or "identity") == "identity":
        raise ConfigError(f"{source}: {key}: model.params.first_stage is 'identity' (pixel "
                          "space), so no run would use the trained first stage; remove "
                          f"{key} or set model.params.first_stage to its checkpoint's path")


def validate_bench(config: Mapping[str, Any], *, source: str) -> None:
    """Check ``config['bench']``: its keys and types, the seeds, the model of every method (as
    :func:`~ldm_smd.blocks.validate_spec` checks ``model``), the scorer block, the fast samplers,
    the first stage's config and the whole config that its ``quick`` overrides make. Raises
    :class:`~ldm_smd.config.ConfigError` naming the key."""
    bench = config["bench"]
    check_keys(bench, _types(BENCH_KEYS), key="bench")
    if not bench.get("methods"):
        raise ConfigError("bench.methods: give at least one method (name: overrides of "
                          "model.params, {} for the base model)")
    if any(int(t) < 2 for t in bench.get("T_list", [])):
        raise ConfigError(f"bench.T_list: every T must be at least 2, got {bench['T_list']}")
    if "seeds" in bench:
        checked_seeds(bench["seeds"], key="bench.seeds")
    for key in ("num_samples", "sample_batch", "workers", "threads_per_worker"):
        if key in bench and int(bench[key]) < 1:
            raise ConfigError(f"bench.{key}: must be at least 1, got {bench[key]}")
    if any(int(s) < 1 for s in bench.get("score_steps") or []):
        raise ConfigError(f"bench.score_steps: every step must be at least 1, got "
                          f"{bench['score_steps']}")
    try:
        validate_spec(scorer_spec(config), key="bench.scorer")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    if bench.get("fast_samplers") is not None:
        _validate_fast_samplers(config)
    if bench.get("first_stage") is not None:
        _validate_first_stage(config, source=source)
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
