"""The benchmark end to end on the shipped ring8 config, shrunk by overrides: every run is an
ordinary stage-2 run (its config loads as one, its checkpoint reloads and samples the same); a
second command on the same folder loses nothing; fast samplers and scores during training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_smd import rng
from ldm_smd.bench.runner import SAMPLE_STREAM, run_mixture_benchmark
from ldm_smd.blocks import instantiate
from ldm_smd.config import ConfigError, load_config
from ldm_smd.errors import OutputError
from ldm_smd.eval.bench_report import tabulate_results
from ldm_smd.eval.mixture_metrics import mixture_metrics
from ldm_smd.sample import load_diffusion_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RING8 = ROOT / "configs" / "mixture" / "ring8.yaml"
SMD = ("smd_paper", "smd_energy")
TINY = [
    "model.params.network.params.hidden=16",
    "model.params.network.params.depth=1",
    "model.params.network.params.time_embed_dim=8",
    "data.params.mixture.params.num_components=4",
    *[f"bench.methods.{m}.network.params.latent_dim=4" for m in SMD],
    "bench.methods.smd_energy.objective.params.num_eta_samples=2",
    "bench.num_samples=512",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_mixture_benchmark(RING8, out_dir=out, overrides=TINY, quick=True,
                                   T_list=[2], seeds=[0, 1], progress=False)
    return out, result


def test_quick_run_writes_tables_json_and_plots(quick_run):
    out, result = quick_run
    for key in ("table", "json", "scatter", "metrics_plot"):
        assert Path(result["files"][key]).is_file()
    table = (out / "results.md").read_text()
    for method in ("vanilla", *SMD, "exact_posterior", "best_gaussian"):
        assert f"| 2 | {method} |" in table
    data = json.loads((out / "results.json").read_text())
    assert data["T_list"] == [2] and data["seeds"] == [0, 1]
    assert len(data["runs"]) == 5 * 2
    trained = [r for r in data["runs"] if r["method"] not in ("exact_posterior", "best_gaussian")]
    assert all(r["steps"] == 20 and r["diverged_at"] is None for r in trained)
    assert all(np.isfinite(r["final_loss"]) and r["ms_per_step"] > 0 for r in trained)
    # the known truth at T = 2 (no training involved): the exact posterior lands on the modes,
    # the best Gaussian denoiser collapses between them
    summary = data["summary"]
    assert summary["exact_posterior"]["2"]["precision"][0] > 0.9
    assert summary["best_gaussian"]["2"]["precision"][0] < 0.5
    assert tabulate_results(out / "results.json") == result["table"]
    # from the log of a stopped run: the same rows (in the order the runs finished)
    lines = sorted(tabulate_results(out / "runs.jsonl").splitlines())
    assert lines == sorted(result["table"].splitlines())


def test_the_table_scores_the_saved_samples(quick_run):
    out, result = quick_run
    mixture = instantiate(result["config"]["data"]["params"]["mixture"])
    for run in result["runs"]:
        if run["seed"] != 0:
            continue
        x = np.load(out / "samples" / f"{run['method']}_T2_seed0.npz")["samples"]
        again = mixture_metrics(torch.from_numpy(x).double(), mixture, seed=0,
                                num_projections=32)
        assert again["precision"] == pytest.approx(run["precision"])
        assert again["sw"] == pytest.approx(run["sw"], rel=1e-4)


@pytest.mark.parametrize("method", ["vanilla", "smd_energy"])
def test_each_run_is_an_ordinary_stage2_run(quick_run, method):
    out, _ = quick_run
    run_dir = out / "runs" / f"{method}_T2_seed1"
    config = load_config(run_dir / "config.yaml")
    assert "bench" not in config and config["seed"] == 1
    assert config["model"]["params"]["schedule"]["params"]["num_timesteps"] == 2
    model = load_diffusion_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    is_smd = type(model.model.diffusion_model).__name__ == "SMDNetwork"
    assert is_smd == (method != "vanilla")
    # sampling the reloaded checkpoint as the benchmark did gives the samples it scored
    x = model.sample_latents(512, generator=rng.generator(1, SAMPLE_STREAM, 2))
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    scored = next(r for r in runs if (r["method"], r["seed"]) == (method, 1))
    mixture = instantiate(config["data"]["params"]["mixture"])
    again = mixture_metrics(x, mixture, seed=1, num_projections=32)
    assert again["precision"] == pytest.approx(scored["precision"])
    assert again["sw"] == pytest.approx(scored["sw"], rel=1e-4)


def test_errors_name_the_key_before_any_work(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"bench\.methods\.smd_paper: .*latnet_dim"):
        run_mixture_benchmark(RING8, out_dir=out, overrides=[
            "bench.methods.smd_paper.network.params.latnet_dim=4"], quick=True)
    with pytest.raises(ConfigError, match="not in bench.methods"):
        run_mixture_benchmark(RING8, out_dir=out, methods=["smd"], quick=True)
    with pytest.raises(ConfigError, match=r"bench\.quick: trainer\.max_stepz"):
        run_mixture_benchmark(RING8, out_dir=out, overrides=["bench.quick=[trainer.max_stepz=3]"])
    assert not out.exists()


def test_a_second_command_on_the_same_folder_loses_nothing(tmp_path):
    out = tmp_path / "bench"
    kw = dict(out_dir=out, overrides=TINY, quick=True, T_list=[2], seeds=[0],
              methods=["vanilla"], progress=False)
    first = run_mixture_benchmark(RING8, **kw)
    ckpt = out / "runs" / "vanilla_T2_seed0" / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    # the same command again: refused, and nothing touched
    with pytest.raises(OutputError, match=r"already holds a benchmark .*--resume.*--overwrite"):
        run_mixture_benchmark(RING8, **kw)
    assert ckpt.stat().st_mtime_ns == stamp
    assert (out / "runs.jsonl").read_text().count("\n") == 3
    # --resume keeps the finished run (not trained again) and gives the same table
    again = run_mixture_benchmark(RING8, **kw, resume=True)
    assert ckpt.stat().st_mtime_ns == stamp
    assert again["table"] == first["table"]
    trained = [r for r in again["runs"] if r["method"] == "vanilla"]
    assert trained[0]["train_s"] == first["runs"][0]["train_s"]
    # more seeds: seed 0 kept; a later resume of seed 0 alone does not lose seed 1's run
    more = run_mixture_benchmark(RING8, **{**kw, "seeds": [0, 1]}, resume=True)
    assert ckpt.stat().st_mtime_ns == stamp and len(more["runs"]) == 6
    ckpt1 = out / "runs" / "vanilla_T2_seed1" / "checkpoints" / "last.ckpt"
    stamp1 = ckpt1.stat().st_mtime_ns
    run_mixture_benchmark(RING8, **kw, resume=True)
    run_mixture_benchmark(RING8, **{**kw, "seeds": [0, 1]}, resume=True)
    assert (ckpt.stat().st_mtime_ns, ckpt1.stat().st_mtime_ns) == (stamp, stamp1)
    # a changed config, or a changed scoring, trains again
    changed = run_mixture_benchmark(RING8, **{**kw, "overrides": [*TINY, "trainer.max_steps=7"]},
                                    resume=True)
    assert [r["steps"] for r in changed["runs"] if r["method"] == "vanilla"] == [7]
    stamp = ckpt.stat().st_mtime_ns
    rescored = run_mixture_benchmark(
        RING8, **{**kw, "overrides": [*TINY, "trainer.max_steps=7", "bench.num_samples=300"]},
        resume=True)
    assert ckpt.stat().st_mtime_ns != stamp
    assert rescored["config"]["bench"]["num_samples"] == 300


def test_overwrite_removes_the_benchmarks_own_files_only_and_only_once_a_run_finished(tmp_path):
    out = tmp_path / "bench"
    kw = dict(out_dir=out, overrides=TINY, quick=True, T_list=[2], seeds=[0, 1],
              methods=["vanilla"], progress=False)
    run_mixture_benchmark(RING8, **kw)
    mine = [out / "my_notes.txt", out / "runs" / "vanilla_T2_seed0" / "samples" / "grid.png",
            out / "runs" / "scratch" / "x.txt", out / "samples" / "picture.png"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    # a first run that fails its checks deletes nothing
    with pytest.raises(Exception, match="16"):
        run_mixture_benchmark(RING8, **{**kw, "overrides": [*TINY, "trainer.precision=16-mixed"]},
                              overwrite=True)
    assert (out / "runs" / "vanilla_T2_seed1" / "scores.json").is_file()
    assert (out / "runs.jsonl").read_text().count("\n") == 6
    run_mixture_benchmark(RING8, **{**kw, "seeds": [0]}, overwrite=True)
    assert not (out / "runs" / "vanilla_T2_seed1").exists()  # the earlier benchmark's run
    assert (out / "runs.jsonl").read_text().count("\n") == 3
    assert sorted((out / "samples").iterdir()) == sorted(
        [out / "samples" / "picture.png", *[out / "samples" / f"{m}_T2_seed0.npz"
                                           for m in ("vanilla", "exact_posterior",
                                                     "best_gaussian")]])
    assert [p.read_text() for p in mine if p.exists()] == ["mine"] * 3
    assert not mine[1].exists()  # inside a run folder the benchmark redid: that run's own


FAST_ROWS = ("ddim", "dpmpp")
FAST = ("bench.fast_samplers={base_T: 50, samplers: {ddim: {kind: ddim, spacing: trailing}, "
        "dpmpp: {kind: dpmpp, spacing: trailing}}}")


def test_fast_samplers_and_scores_during_training(quick_run, tmp_path):
    """One base model per seed, sampled by each fast sampler at steps = T; a run scored during
    training ends with the very numbers of a run that was not (scoring draws its own noise)."""
    out = tmp_path / "bench"
    kw = dict(out_dir=out, overrides=[*TINY, FAST, "bench.score_steps=[10, 15]"], quick=True,
              T_list=[2, 3], seeds=[0], methods=["vanilla"], progress=False)
    result = run_mixture_benchmark(RING8, **kw)
    runs = {(r["method"], r["T"]): r for r in result["runs"]}
    assert set(runs) == {(m, T) for m in ("vanilla", "ddim", "dpmpp", "exact_posterior",
                                          "best_gaussian") for T in (2, 3)}
    plain = next(r for r in quick_run[1]["runs"] if (r["method"], r["seed"]) == ("vanilla", 0))
    scored = runs[("vanilla", 2)]
    assert sorted(scored["by_step"]) == ["10", "15"]
    assert scored["by_step"]["10"]["sw"] != scored["sw"]
    for key in ("sw", "precision", "logp_mean", "final_loss"):
        assert scored[key] == plain[key]
    base = out / "runs" / "fast_vanilla_T50_seed0"
    config = load_config(base / "config.yaml")
    assert config["model"]["params"]["schedule"]["params"]["num_timesteps"] == 50
    fast = [runs[(m, T)] for m in ("ddim", "dpmpp") for T in (2, 3)]
    assert all(r["base_T"] == 50 and r["steps"] == 20 for r in fast)
    # two steps of DPM-Solver++(2M) are DDIM's (its first step is first order, its last returns
    # x0); with three they part
    assert runs[("dpmpp", 2)]["sw"] == pytest.approx(runs[("ddim", 2)]["sw"], rel=1e-6)
    assert abs(runs[("dpmpp", 3)]["sw"] - runs[("ddim", 3)]["sw"]) > 1e-3
    # the table has the rows, and the leading metric at the training steps
    table = (out / "results.md").read_text()
    assert "| 3 | dpmpp |" in table and "trained at T = 50" in table
    assert "## sw at training steps" in table and "| 2 | vanilla |" in table.split("## sw")[1]
    # the base model samples again as the benchmark did (its kept samples are what it scored)
    model = load_diffusion_checkpoint(base / "checkpoints" / "last.ckpt")
    x = model.sample_latents(512, generator=rng.generator(0, SAMPLE_STREAM, 3), sampler="ddim",
                             steps=3, spacing="trailing")
    kept = np.load(base / "samples_ddim_T3.npz")["samples"]
    assert np.allclose(x.numpy(), kept, atol=1e-6)
    # a resume keeps the base model and every run (nothing trained again)
    stamp = (base / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = run_mixture_benchmark(RING8, **kw, resume=True)
    assert (base / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    assert again["table"] == result["table"]


def test_a_resume_samples_a_finished_base_model_at_the_steps_it_lacks(tmp_path, capsys):
    """A second command that asks the fast samplers for other step counts trains nothing: the
    base model is sampled where rows are missing, its other rows stay; a base model that diverged
    or an --overwrite is trained again."""
    out = tmp_path / "bench"
    kw = dict(out_dir=out, overrides=[*TINY, FAST], quick=True, seeds=[0], methods=["vanilla"],
              progress=False)
    base = out / "runs" / "fast_vanilla_T50_seed0"
    checkpoint = base / "checkpoints" / "last.ckpt"

    def rows(result):
        return {(r["method"], r["T"]): r for r in result["runs"] if r["method"] in FAST_ROWS}

    def saved():
        return json.loads((base / "scores.json").read_text())["records"]

    first = rows(run_mixture_benchmark(RING8, **kw, T_list=[2, 3]))
    stamp = checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    second = rows(run_mixture_benchmark(RING8, **kw, T_list=[2, 4], resume=True))
    assert ("fast_vanilla_T50_seed0 (it lacks rows asked for now: its base model is kept and "
            "samples them)") in capsys.readouterr().out
    assert checkpoint.stat().st_mtime_ns == stamp
    for row in FAST_ROWS:
        same = json.dumps(second[(row, 2)], sort_keys=True) == json.dumps(first[(row, 2)],
                                                                          sort_keys=True)
        assert same  # kept, not sampled again (its sample_s too; NaN cells compare equal)
        assert second[(row, 4)]["train_s"] == first[(row, 2)]["train_s"]  # the base's cost
    assert {(r["method"], r["T"]) for r in saved()} == {(m, T) for m in FAST_ROWS
                                                          for T in (2, 3, 4)}
    model = load_diffusion_checkpoint(checkpoint)
    x = model.sample_latents(512, generator=rng.generator(0, SAMPLE_STREAM, 4), sampler="dpmpp",
                             steps=4, spacing="trailing")
    assert np.allclose(x.numpy(), np.load(base / "samples_dpmpp_T4.npz")["samples"], atol=1e-6)
    # no step count in common: still sampled, not trained
    run_mixture_benchmark(RING8, **kw, T_list=[5], resume=True)
    assert checkpoint.stat().st_mtime_ns == stamp
    assert len(saved()) == 2 * 4
    # a base model that diverged is trained again: its last checkpoint is not what it scored
    (base / "scores.json").write_text(json.dumps(
        {**json.loads((base / "scores.json").read_text()),
         "records": [{**r, "diverged_at": 7} for r in saved()]}))
    capsys.readouterr()
    run_mixture_benchmark(RING8, **kw, T_list=[6], resume=True)
    assert "fast_vanilla_T50_seed0 (it lacks rows asked for now)" in capsys.readouterr().out
    assert checkpoint.stat().st_mtime_ns != stamp
    assert {r["T"] for r in saved()} == {6}
    stamp = checkpoint.stat().st_mtime_ns
    run_mixture_benchmark(RING8, **kw, T_list=[6, 7], overwrite=True)  # --overwrite trains again
    assert checkpoint.stat().st_mtime_ns != stamp


def test_resume_refuses_the_folder_of_another_config(tmp_path, capsys):
    """The issue's case: a --resume of grid25 on ring8's folder replaced all of it silently."""
    out = tmp_path / "bench"
    kw = dict(out_dir=out, overrides=TINY, quick=True, T_list=[2], seeds=[0],
              methods=["vanilla"], progress=False)
    run_mixture_benchmark(RING8, **kw)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    grid25 = RING8.parent / "grid25.yaml"
    other = dict(kw, overrides=["model.params.network.params.hidden=16"])
    with pytest.raises(OutputError, match=r"holds the benchmark of .*ring8\.yaml .*not of "
                                          r".*grid25\.yaml.*--overwrite"):
        run_mixture_benchmark(grid25, **other, resume=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    run_mixture_benchmark(grid25, **other, overwrite=True)
    said = capsys.readouterr().out
    assert "replaced the earlier benchmark" in said and "ring8.yaml" in said
    assert "runs.jsonl" in said and "samples/exact_posterior_T2_seed0.npz" in said
    assert json.loads((out / "bench.json").read_text())["config_file"].endswith("grid25.yaml")


def test_a_resume_names_the_runs_it_replaces(tmp_path, capsys):
    out = tmp_path / "bench"
    kw = dict(out_dir=out, overrides=TINY, quick=True, T_list=[2], seeds=[0],
              methods=["vanilla"], progress=False)
    run_mixture_benchmark(RING8, **kw)
    capsys.readouterr()
    run_mixture_benchmark(RING8, **{**kw, "overrides": [*TINY, "trainer.max_steps=7"]},
                          resume=True)
    said = capsys.readouterr().out
    assert "vanilla_T2_seed0 (its config differs)" in said
    assert "0 finished job(s) kept, 3 run now" in said


@pytest.mark.parametrize("seeds", [[-1], [2**32], [0, 0]])
def test_seeds_are_checked_before_any_work(tmp_path, seeds, capsys):
    from ldm_smd.cli import main

    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"--seeds: .*(not a seed|twice)"):
        run_mixture_benchmark(RING8, out_dir=out, quick=True, seeds=seeds)
    code = main(["bench-mixture", "--config", str(RING8), "--out", str(out), "--quick",
                 "--seeds", *map(str, seeds)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seeds" in err[0]
    with pytest.raises(ConfigError, match=r"bench\.seeds: .*not a seed"):
        load_config(RING8, [f"bench.seeds=[{seeds[0] if seeds[0] != 0 else -5}]"])
    assert not out.exists()


def test_a_second_command_into_a_held_folder_is_refused(tmp_path):
    from ldm_smd.locks import FolderLock, FolderLockedError

    out = tmp_path / "bench"
    with FolderLock(out, what="--out", command="ldm-smd bench --config other.yaml"):
        with pytest.raises(FolderLockedError, match=r"other\.yaml"):
            run_mixture_benchmark(RING8, out_dir=out, overrides=TINY, quick=True,
                                  methods=["vanilla"], progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".ldm-smd.lock"]
    assert not out.exists()  # the lock made it and nothing was written


POOL_SCRIPT = '''
import os, sys, time
from ldm_smd.bench.runner import worker_pool

def report(folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(600)

if __name__ == "__main__":
    pool = worker_pool(2, 1)
    for _ in range(2):
        pool.submit(report, sys.argv[1])
    time.sleep(600)
'''


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_workers_end_when_the_benchmark_process_is_killed(tmp_path):
    """kill -9 of the benchmark drops its folder lock; its training workers must not go on
    writing into run folders that a second command may have taken over."""
    script, pids = tmp_path / "pool.py", tmp_path / "pids"
    script.write_text(POOL_SCRIPT)
    pids.mkdir()
    bench, workers = subprocess.Popen([sys.executable, str(script), str(pids)]), []
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and all(map(_running, workers)), workers
        bench.kill()
        bench.wait()
        deadline = time.monotonic() + 30
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_running, workers)), "a worker outlived its benchmark"
    finally:
        bench.kill()
        for pid in filter(_running, workers):  # a failed check leaves no sleeper behind
            os.kill(pid, signal.SIGKILL)
