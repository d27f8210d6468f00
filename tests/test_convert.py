"""Loading first-stage weights (ours, CompVis, diffusers) and what they record, exporting."""

import json

import pytest
import torch
import yaml

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.convert import (
    RecordedScales,
    architecture_of,
    build_autoencoder,
    export_diffusers,
    load_diffusers,
    load_first_stage,
)

DDCONFIG = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                double_z=True, resolution=16, in_channels=3, out_ch=3, dropout=0.0)


def _perturbed(module, seed=0):
    # random non-trivial weights everywhere (norm scales and biases included)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 4, 4, 4, generator=gen)


def _ours():
    torch.manual_seed(0)
    return _perturbed(build_autoencoder(ddconfig=DDCONFIG, embed_dim=4))


def _assert_same(ours, encode_other, decode_other):
    x, z = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, encode_other(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), decode_other(z), atol=1e-5, rtol=0)


def _diffusers_model():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64],
        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16,
        scaling_factor=0.13025,
    )
    return diffusers, _perturbed(model)


def test_diffusers_folder_loads_with_parity(tmp_path):
    _, theirs = _diffusers_model()
    theirs.save_pretrained(tmp_path / "vae")
    ours, scales = load_first_stage(tmp_path / "vae")
    assert scales == RecordedScales(diffusers=pytest.approx(0.13025))
    assert architecture_of(ours)["ddconfig"]["ch_mult"] == [1, 2, 2]
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    _assert_same(ours, lambda x: theirs.encode(x).latent_dist.mean,
                 lambda z: theirs.decode(z).sample)


def test_export_to_diffusers_round_trips(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = _ours()
    export_diffusers(ours, tmp_path / "export", scaling_factor=0.5)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["scaling_factor"] == 0.5 and config["block_out_channels"] == [32, 64, 64]
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
    _assert_same(ours, lambda x: theirs.encode(x).latent_dist.mean,
                 lambda z: theirs.decode(z).sample)
    again, scales = load_first_stage(tmp_path / "export")
    assert scales == RecordedScales(diffusers=0.5)
    _assert_same(ours, lambda x: again.encode(x).mean, again.decode)


def test_export_refuses_what_diffusers_cannot_hold(tmp_path):
    ae = build_autoencoder(ddconfig={**DDCONFIG, "attn_resolutions": [8]}, embed_dim=4)
    with pytest.raises(ValueError, match="attn_resolutions"):
        export_diffusers(ae, tmp_path / "x")
    ae = build_autoencoder(ddconfig=DDCONFIG, embed_dim=3)
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        export_diffusers(ae, tmp_path / "y")


def test_diffusers_key_mismatch_lists_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    export_diffusers(_ours(), tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("decoder.up_blocks.0.resnets.1.conv2.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as info:
        load_diffusers(tmp_path / "vae")
    assert "decoder.up_blocks.0.resnets.1.conv2.weight" in str(info.value)
    assert "encoder.extra.weight" in str(info.value)
    weights.unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is missing"):
        load_first_stage(tmp_path / "vae")


def test_legacy_diffusers_attention_names_load(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = _ours()
    export_diffusers(ours, tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(weights).items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[key] = value
    save_file(state, weights)
    again, _ = load_first_stage(tmp_path / "vae")
    _assert_same(ours, lambda x: again.encode(x).mean, again.decode)


def _compvis_checkpoint(tmp_path, ours, *, with_config=True, extra=None):
    state = dict(ours.state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    state.update(extra or {})
    folder = tmp_path / "kl-f4"
    folder.mkdir(exist_ok=True)
    torch.save({"state_dict": state, "global_step": 5}, folder / "model.ckpt")
    if with_config:
        config = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                            "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                                       "ddconfig": DDCONFIG, "lossconfig": {}}}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "model.ckpt"


def test_compvis_checkpoint_with_config_beside_it(tmp_path):
    ours = _ours()
    path = _compvis_checkpoint(tmp_path, ours)
    loaded, scales = load_first_stage(path)
    assert scales == RecordedScales()  # a first-stage config.yaml records no scale factor
    _assert_same(ours, lambda x: loaded.encode(x).mean, loaded.decode)


def test_compvis_checkpoint_needs_an_architecture(tmp_path):
    ours = _ours()
    path = _compvis_checkpoint(tmp_path, ours, with_config=False)
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_first_stage(path)
    loaded, _ = load_first_stage(path, ddconfig=DDCONFIG, embed_dim=4)
    _assert_same(ours, lambda x: loaded.encode(x).mean, loaded.decode)


def test_compvis_unexpected_and_missing_keys_are_listed(tmp_path):
    ours = _ours()
    path = _compvis_checkpoint(tmp_path, ours, extra={"encoder.surprise.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="encoder.surprise.weight"):
        load_first_stage(path)
    state = {k: v for k, v in ours.state_dict().items() if k != "post_quant_conv.bias"}
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="post_quant_conv.bias"):
        load_first_stage(path)


def test_compvis_ldm_checkpoint_gives_its_first_stage_and_scale(tmp_path):
    ours = _ours()
    state = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    state["model.diffusion_model.out.weight"] = torch.zeros(2)
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    config = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "ddconfig": DDCONFIG}}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    loaded, scales = load_first_stage(tmp_path / "model.ckpt")
    assert scales == RecordedScales(config_yaml=pytest.approx(0.18215))
    _assert_same(ours, lambda x: loaded.encode(x).mean, loaded.decode)


def test_our_checkpoint_uses_its_hyper_parameters(tmp_path):
    ours = _ours()
    state = dict(ours.state_dict())
    state["loss.logvar"] = torch.zeros(())
    ckpt = {"state_dict": state, "hyper_parameters": {"ddconfig": DDCONFIG, "embed_dim": 4,
                                                       "learning_rate": 1e-4}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded, scales = load_first_stage(tmp_path / "last.ckpt")
    assert scales == RecordedScales()
    _assert_same(ours, lambda x: loaded.encode(x).mean, loaded.decode)


class _NotTensors:
    pass


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "obj": _NotTensors()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        load_first_stage(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_first_stage(tmp_path / "absent.ckpt")


def test_our_stage2_checkpoint_gives_its_first_stage(tmp_path):
    ours = _ours()
    state = {f"first_stage_model.autoencoder.{k}": v for k, v in ours.state_dict().items()}
    state["model.diffusion_model.out.weight"] = torch.zeros(2)
    hparams = {"first_stage_config": {"ddconfig": DDCONFIG, "embed_dim": 4}, "scale_factor": 0.3}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "ldm.ckpt")
    loaded, scales = load_first_stage(tmp_path / "ldm.ckpt")
    assert scales == RecordedScales(stage2=pytest.approx(0.3))
    _assert_same(ours, lambda x: loaded.encode(x).mean, loaded.decode)
