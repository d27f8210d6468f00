"""FID / KID / precision-recall maths, the Inception loader, and evaluate() end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from ldm_smd.eval import fid
from ldm_smd.eval.evaluate import evaluate
from ldm_smd.eval.inception import (
    WEIGHTS_ENV,
    WEIGHTS_NAME,
    FIDInception,
    InceptionWeightsMissing,
    build_fid_inception,
    resolve_weights_path,
)
from ldm_smd.images import save_singles, to_uint8


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(600, 48)) @ rng.normal(size=(48, 48)) * 0.3
    b = rng.normal(size=(600, 48)) * 1.2 + 0.5
    mu1, s1 = fid.feature_statistics(a)
    mu2, s2 = fid.feature_statistics(b)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - _scipy_fid(mu1, s1, mu2, s2)) < 1e-6
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_low_rank_frechet_matches_full_form():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(12, 40))
    mu2, s2 = fid.feature_statistics(rng.normal(size=(200, 40)) * 0.7 + 0.2)
    mu1, s1 = fid.feature_statistics(a)
    full = fid.frechet_distance(mu1, s1, mu2, s2)
    # the full form takes square roots of rounding noise in the 28 null eigenvalues of s1
    assert abs(fid.frechet_distance_low_rank(a, mu2, s2) - full) < 1e-5


def test_frechet_distance_singular_covariance_is_finite_and_real():
    rng = np.random.default_rng(2)
    mu1, s1 = fid.feature_statistics(rng.normal(size=(10, 32)))
    mu2, s2 = fid.feature_statistics(rng.normal(size=(10, 32)) + 1)
    value = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    ident, _ = fid.kernel_inception_distance(a, a, num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 0.05 and abs(ident) < 0.05
    assert shifted > 20 * max(abs(same), abs(ident))


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 8))
    assert fid.precision_recall(a, a, k=3) == (1.0, 1.0)
    p, r = fid.precision_recall(a, a + 100.0, k=3)
    assert p == 0.0 and r == 0.0


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(fid.TooFewSamples, match="at least 2048"):
        fid.check_num_samples(100)
    fid.check_num_samples(100, min_samples=10)


def test_missing_weights_error_names_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsMissing) as info:
        resolve_weights_path()
    msg = str(info.value)
    assert WEIGHTS_NAME in msg and "hub/checkpoints" in msg and "bench-mixture" in msg
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(InceptionWeightsMissing, match="nowhere.pth"):
        FIDInception(weights_path=str(missing))
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(InceptionWeightsMissing, match=WEIGHTS_ENV):
        resolve_weights_path()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = build_fid_inception()
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def _write_pngs(folder, n, seed, size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png"
        )
    return folder


def test_random_weights_load_through_env_and_give_2048_features(random_weights, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(random_weights))
    model = FIDInception()
    assert model.weights_path == str(random_weights)
    out = model(torch.rand(1, 3, 20, 20))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    bad = random_weights.with_name("bad.pth")
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        FIDInception(weights_path=str(bad))


def test_evaluate_end_to_end_with_cache(random_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_SMD_CACHE", str(tmp_path / "cache"))
    samples = _write_pngs(tmp_path / "samples", 2, seed=0)
    ref = _write_pngs(tmp_path / "ref", 2, seed=1)
    with pytest.raises(fid.TooFewSamples, match="2048"):
        evaluate(samples, ref, weights_path=random_weights, progress=False)
    out_json = tmp_path / "metrics.json"
    kw = dict(weights_path=random_weights, min_samples=2, progress=False, pr_k=1)
    res = evaluate(samples, ref, out_json=out_json, batch_size=2, **kw)
    assert json.loads(out_json.read_text())["fid"] == pytest.approx(res["fid"])
    assert res["fid"] > 0 and res["kid_mean"] is not None and res["num_samples"] == 2
    assert 0 <= res["precision"] <= 1 and "warning" in res
    cached = list((tmp_path / "cache" / "fid_stats").glob("*.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as data:
        mu, sigma, feats = data["mu"], data["sigma"], data["features"]
    assert feats.shape == (2, 2048)
    again = evaluate(samples, cached[0], **kw)
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-9)
    # the samples' own statistics against themselves: FID 0
    assert abs(fid.frechet_distance_low_rank(feats, mu, sigma)) < 1e-6


def test_lossy_samples_refused(tmp_path):
    (tmp_path / "s").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "s" / "a.jpg")
    with pytest.raises(ValueError, match="PNG"):
        fid.list_images(tmp_path / "s", samples=True)


def test_save_png_pins_quantisation(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5).repeat(1, 3, 1, 1)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]
    (path,) = save_singles(x, tmp_path)
    assert np.asarray(Image.open(path))[0, :, 0].tolist() == [0, 64, 128, 255, 255]
