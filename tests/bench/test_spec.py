"""The ``bench:`` block: merging a method over the base model, the config of one run, and the
errors a misspelt or impossible benchmark config gets at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_smd.bench.spec import bench_options, merge_blocks, method_model, run_config
from ldm_smd.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
MIXTURES = sorted((ROOT / "configs" / "mixture").glob("*.yaml"))
BENCHMARKS = MIXTURES + sorted((ROOT / "configs" / "bench").glob("*.yaml"))


def test_a_block_with_a_target_replaces_a_mapping_merges():
    base = {"network": {"target": "a.B", "params": {"dim": 2, "hidden": 8}},
            "objective": {"target": "a.O", "params": {"loss_type": "l2"}}, "lr": 1.0}
    out = merge_blocks(base, {"network": {"target": "a.S", "params": {"latent_dim": 4}},
                              "objective": {"params": {"loss_type": "l1"}}, "lr": 2.0})
    assert out["network"] == {"target": "a.S", "params": {"latent_dim": 4}}  # no 'hidden' left
    assert out["objective"] == {"target": "a.O", "params": {"loss_type": "l1"}}
    assert out["lr"] == 2.0 and base["lr"] == 1.0  # the base is not changed


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_shipped_benchmark_configs_are_ordinary_runs_per_method(path):
    config = load_config(path)
    quick = load_config(path, bench_options(config)["quick"])
    assert quick["trainer"]["max_steps"] < config["trainer"]["max_steps"]
    methods = config["bench"]["methods"]
    assert list(methods)[0] == "vanilla"
    for method in methods:
        run = run_config(config, method, 3, 7)
        validate_config(run, source=f"{path.name}:{method}")
        params = run["model"]["params"]
        assert "bench" not in run and run["seed"] == 7 == params["seed"]
        assert run["data"]["params"]["seed"] == 7
        assert params["schedule"]["params"]["num_timesteps"] == 3
        smd = params["network"]["target"] == "ldm_smd.nn.smd.SMDNetwork"
        assert smd == method.startswith("smd"), method
        if smd:  # the SMD network wraps the base backbone, as configured once
            assert params["network"]["params"]["backbone"] == config["model"]["params"]["network"]
    assert method_model(config, "vanilla") == config["model"]


def test_method_overrides_follow_the_base_backbone():
    config = load_config(MIXTURES[0], ["model.params.network.params.hidden=24"])
    smd = method_model(config, "smd_paper")["params"]["network"]
    assert smd["params"]["backbone"]["params"]["hidden"] == 24


@pytest.mark.parametrize(("override", "match"), [
    ("bench.T_list=[1, 2]", "T must be at least 2"),
    ("bench.methods={}", "at least one method"),
    ("bench.seeds=[a]", r"bench\.seeds: expected list\[int\]"),
    ("bench.methods.smd_energy.network=${model.params.network}",
     "needs an SMD network"),
    ("bench.methods.vanilla.objective={target: ldm_smd.diffusion.objectives.EnergyObjective}",
     r"bench\.methods\.vanilla: .*EnergyObjective .*needs an SMD network"),
    ("bench.methods.smd_paper.sampler.params.eta=0.5", r"sampler\.params\.eta: unknown"),
    ("bench.workerz=2", r"bench\.workerz: unknown key"),
])
def test_impossible_benchmarks_are_refused_at_load(override, match):
    ring8 = next(p for p in MIXTURES if p.stem == "ring8")
    with pytest.raises(ConfigError, match=match):
        load_config(ring8, [override])


def test_any_loader_checks_the_bench_block_though_the_config_module_imports_no_benchmark():
    """A fresh interpreter that imports only the config loader still refuses a bad ``bench:``
    block (the section registers itself through the package's ``__init__``)."""
    import subprocess
    import sys

    code = ("import sys; from ldm_smd.config import ConfigError, load_config\n"
            "assert 'ldm_smd.bench.runner' not in sys.modules\n"
            f"try:\n    load_config({str(MIXTURES[0])!r}, ['bench.workerz=2'])\n"
            "except ConfigError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "bench.workerz: unknown key" in out.stdout


def test_a_registered_section_is_validated_and_listed(monkeypatch):
    from ldm_smd import config as cfg

    seen = []

    def check(config, *, source):
        seen.append(source)
        if config["extra"] != 1:
            raise ConfigError("extra: must be 1")

    monkeypatch.setitem(cfg.SECTIONS, "extra", ("x", check))
    base = {"model": {"target": "ldm_smd.nn.mlp.MLPDenoiser", "params": {"dim": 2}}}
    validate_config({**base, "extra": 1}, source="a.yaml")
    with pytest.raises(ConfigError, match="extra: must be 1"):
        validate_config({**base, "extra": 2}, source="b.yaml")
    assert seen == ["a.yaml", "b.yaml"]
    monkeypatch.delitem(cfg.SECTIONS, "extra")
    with pytest.raises(ConfigError, match=r"unknown top-level key.*extra.*; valid: .*bench"):
        validate_config({**base, "extra": 1})


def test_image_benchmarks_name_their_scorer_and_fast_samplers():
    from ldm_smd.bench.spec import fast_samplers, scorer_spec

    for name in ("mnist5k-pixel", "mnist5k-latent"):
        config = load_config(ROOT / "configs" / "bench" / f"{name}.yaml")
        assert scorer_spec(config)["target"] == "ldm_smd.bench.scorers.ImageScores"
        fast = fast_samplers(config)
        assert fast["base_T"] >= max(config["bench"]["T_list"])
        assert {o["kind"] for o in fast["samplers"].values()} == {"ddim", "dpmpp"}
        assert config["bench"]["num_samples"] == 1000  # the held-out split's size
    ring8 = load_config(MIXTURES[-1])
    assert scorer_spec(ring8)["params"]["mixture"] == ring8["data"]["params"]["mixture"]
    without = load_config(MIXTURES[-1], ["~bench.scorer", "bench.quick=[]"])  # the default
    assert scorer_spec(without)["target"] == "ldm_smd.bench.scorers.MixtureScorer"


@pytest.mark.parametrize(("override", "match"), [
    ("bench.fast_samplers={base_T: 3, samplers: {ddim: {kind: ddim}}}",
     r"base_T: 3 is less than the largest T"),
    ("bench.fast_samplers={base_T: 100, samplers: {vanilla: {kind: ddim}}}",
     r"samplers\.vanilla: a method of bench\.methods has this name"),
    ("bench.fast_samplers={base_T: 100, samplers: {ddim: {kind: ddim, eta: 1}}}",
     r"samplers\.ddim\.eta: unknown key of Sampler"),
    ("bench.fast_samplers={base_T: 100, method: smd, samplers: {ddim: {}}}",
     r"fast_samplers\.method: 'smd' is not in bench\.methods"),
    ("bench.first_stage={config: configs/autoencoder/nope.yaml}", r"first_stage\.config: .*nope"),
    ("bench.first_stage={config: configs/autoencoder/mnist5k-kl-f4.yaml, max_stepz: 3}",
     r"first_stage\.max_stepz: unknown key"),
    ("bench.first_stage={config: configs/autoencoder/mnist5k-kl-f4.yaml}",
     r"first_stage is 'identity'"),
    ("bench.scorer={target: ldm_smd.bench.scorers.MixtureScorer, params: {projections: 3}}",
     r"bench\.scorer\.params\.projections: unknown parameter"),
    ("~data.params.mixture", r"data\.params"),
    ("bench.score_steps=[0]", r"score_steps: every step must be at least 1"),
])
def test_impossible_bench_blocks_are_refused_at_load(override, match):
    ring8 = next(p for p in MIXTURES if p.stem == "ring8")
    with pytest.raises(ConfigError, match=match):
        load_config(ring8, [override])
