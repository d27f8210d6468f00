"""The ``bench:`` block: merging a method over the base model, the config of one run, and the
errors a misspelt or impossible benchmark config gets at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_smd.bench.spec import bench_options, merge_blocks, method_model, run_config
from ldm_smd.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
MIXTURES = sorted((ROOT / "configs" / "mixture").glob("*.yaml"))


def test_a_block_with_a_target_replaces_a_mapping_merges():
    base = {"network": {"target": "a.B", "params": {"dim": 2, "hidden": 8}},
            "objective": {"target": "a.O", "params": {"loss_type": "l2"}}, "lr": 1.0}
    out = merge_blocks(base, {"network": {"target": "a.S", "params": {"latent_dim": 4}},
                              "objective": {"params": {"loss_type": "l1"}}, "lr": 2.0})
    assert out["network"] == {"target": "a.S", "params": {"latent_dim": 4}}  # no 'hidden' left
    assert out["objective"] == {"target": "a.O", "params": {"loss_type": "l1"}}
    assert out["lr"] == 2.0 and base["lr"] == 1.0  # the base is not changed


@pytest.mark.parametrize("path", MIXTURES, ids=lambda p: p.stem)
def test_shipped_mixture_configs_are_ordinary_runs_per_method(path):
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
