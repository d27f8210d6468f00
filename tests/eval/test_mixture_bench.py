"""The mixture benchmark runner end to end on a tiny config (a few training steps)."""

import json

import pytest
import yaml

from ldm_smd.eval.mixture_bench import load_config, run_mixture_benchmark, tabulate_results

TINY = {
    "mixture": {"kind": "ring", "num_components": 4, "radius": 2.0, "std": 0.1},
    "schedule": {"kind": "cosine"},
    "parameterization": "eps",
    "network": {"target": "ldm_smd.nn.mlp.MLPDenoiser",
                "params": {"hidden": 16, "depth": 1, "time_embed_dim": 8}},
    "smd": {"latent_dim": 4},
    "objectives": {"smd_mixture": {"num_eta_samples": 2, "tau": "elbo"}},
    "train": {"steps": 200, "batch_size": 32, "lr": 0.005},
    "bench": {"T_list": [2, 3], "seeds": [0, 1], "num_samples": 128, "num_projections": 16},
    "quick": {"train": {"steps": 3}, "bench": {"T_list": [2], "seeds": [0]}},
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_quick_run_writes_table_json_and_plots(tiny_config, tmp_path):
    out = tmp_path / "out"
    res = run_mixture_benchmark(tiny_config, out_dir=out, quick=True, seeds=[0, 1],
                                progress=False)
    for key in ("table", "json", "scatter", "metrics_plot"):
        path = res["files"][key]
        assert (out / path.split("/")[-1]).is_file()
    table = (out / "results.md").read_text()
    for method in ("vanilla", "smd_paper", "smd_mixture", "exact_posterior", "best_gaussian"):
        assert f"| 2 | {method} |" in table
    data = json.loads((out / "results.json").read_text())
    assert data["T_list"] == [2] and data["seeds"] == [0, 1]
    assert len(data["runs"]) == 5 * 2
    assert all(r["steps"] == 3 for r in data["runs"] if r["method"] == "vanilla")
    summary = data["summary"]
    assert summary["exact_posterior"]["2"]["sw_removed"][0] == pytest.approx(1.0)
    assert summary["vanilla"]["2"]["sw_removed"][0] == pytest.approx(0.0)
    assert 0.0 <= summary["smd_mixture"]["2"]["precision"][0] <= 1.0
    assert (out / "samples" / "smd_paper_T2_seed0.npz").is_file()
    assert tabulate_results(out / "results.json") == res["table"]


def test_config_errors_name_the_key(tiny_config, tmp_path):
    bad = dict(TINY, train={"stepz": 3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="stepz"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown methods"):
        run_mixture_benchmark(tiny_config, out_dir=tmp_path / "c", methods=["smd"], quick=True)


@pytest.mark.parametrize("name", ["ring8", "grid25", "proto32d", "images16"])
def test_public_configs_load(name):
    cfg = load_config(f"configs/mixture/{name}.yaml")
    quick = load_config(f"configs/mixture/{name}.yaml", quick=True)
    assert cfg["bench"]["methods"] == ["vanilla", "smd_paper", "smd_mixture"]
    assert quick["train"]["steps"] < cfg["train"]["steps"]
