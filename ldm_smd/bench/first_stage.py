"""The first stage of a latent benchmark, trained once for all its runs (``bench.first_stage``).

The autoencoder config (``bench.first_stage.config`` with ``max_steps``, ``batch_size`` and
``overrides``) is trained on the benchmark's own data block by :func:`ldm_smd.train.train` into
``OUT/first_stage/``, like any stage-1 run; its latent scale factor is then estimated on that data
(:func:`ldm_smd.latent_scale.estimate_scale_factor`, posterior samples drawn from a generator
seeded ``derive_seed(seed, SCALE_STREAM, 0)``) and written to ``OUT/first_stage/scale.json``.
Every run of the benchmark gets ``model.params.first_stage`` (the checkpoint) and
``scale_factor`` from it. A later ``--resume`` keeps the first stage when its saved config is the
one this benchmark would train and its scale factor was written; otherwise it is trained again
(the earlier one is moved aside until the new one is trained, then deleted).
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ldm_smd import rng
from ldm_smd.bench.earlier import FIRST_STAGE
from ldm_smd.bench.spec import first_stage_overrides
from ldm_smd.config import load_config, save_config, to_plain
from ldm_smd.errors import DataError
from ldm_smd.jsonio import write_json
from ldm_smd.run_folder import LAST

#: first key of the seed of the scale factor's posterior samples (see :mod:`ldm_smd.rng`)
SCALE_STREAM = 13
SCALE_FILE = "scale.json"


def first_stage_config(config: dict, out: Path) -> dict[str, Any]:
    """The stage-1 config the benchmark trains: the autoencoder config with its overrides, the
    benchmark's data (with the first stage's ``batch_size`` where given) and
    ``run_dir = OUT/first_stage``."""
    block = config["bench"]["first_stage"]
    stage1 = load_config(block["config"], first_stage_overrides(config))
    data = copy.deepcopy(config["data"])
    own = ((stage1.get("data") or {}).get("params") or {}).get("batch_size")
    batch = block.get("batch_size", own)
    if batch is not None:
        data["params"] = {**(data.get("params") or {}), "batch_size": int(batch)}
    return {**stage1, "data": data, "run_dir": str(out / FIRST_STAGE)}


def _kept(run_dir: Path, stage1: dict) -> float | None:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        scale = json.loads((run_dir / SCALE_FILE).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    same = saved == yaml.safe_load(yaml.safe_dump(to_plain(stage1), sort_keys=False))
    if not same or not (run_dir / "checkpoints" / LAST).is_file():
        return None
    return float(scale["scale_factor"])


def _scale_factor(checkpoint: Path, config: dict, batches: int) -> float:
    from ldm_smd.convert import load_first_stage
    from ldm_smd.latent_scale import estimate_scale_factor
    from ldm_smd.train import build_block, setup_data

    autoencoder, _ = load_first_stage(str(checkpoint))
    data = build_block("data", config["data"])
    setup_data(data)
    images = (b["image"] for b in itertools.islice(data.train_dataloader(), batches))
    generator = rng.generator(int(config.get("seed", 0)), SCALE_STREAM, 0)
    try:
        return estimate_scale_factor(autoencoder, images, generator=generator)
    except ValueError as exc:
        raise DataError(f"bench.first_stage: the latent scale factor: {exc}") from exc


def prepare_first_stage(config: dict, out: Path, *, reuse: bool) -> dict:
    """``config`` with its runs' first stage: kept from ``OUT/first_stage`` (where ``reuse``:
    ``--resume``) or trained there now (module docstring). A config without
    ``bench.first_stage`` is returned as it is."""
    block = (config.get("bench") or {}).get("first_stage")
    if block is None:
        return config
    from ldm_smd.train import train

    stage1 = first_stage_config(config, out)
    run_dir = out / FIRST_STAGE
    scale = _kept(run_dir, stage1) if reuse else None
    if scale is None:
        aside = out / f".{FIRST_STAGE}.replaced"
        if run_dir.exists():
            why = "--overwrite" if not reuse else "another config, or unfinished"
            print(f"[ldm-smd] bench: replacing the first stage in {run_dir} ({why}): "
                  "training it again")
            shutil.rmtree(aside, ignore_errors=True)
            run_dir.rename(aside)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "first_stage.yaml"
                save_config(stage1, path)
                train(path)
            scale = _scale_factor(run_dir / "checkpoints" / LAST, config,
                                  int(block.get("scale_batches", 8)))
        except BaseException:
            if aside.exists():  # the earlier first stage comes back
                shutil.rmtree(run_dir, ignore_errors=True)
                aside.rename(run_dir)
            raise
        write_json(run_dir / SCALE_FILE, {"scale_factor": scale,
                                          "batches": int(block.get("scale_batches", 8))})
        shutil.rmtree(aside, ignore_errors=True)
    else:
        print(f"[ldm-smd] bench: first stage kept from {run_dir} (scale factor {scale:.6g})")
    out_config = copy.deepcopy(config)
    params = out_config["model"].setdefault("params", {})
    params["first_stage"] = str(run_dir / "checkpoints" / LAST)
    params["scale_factor"] = scale
    return out_config
