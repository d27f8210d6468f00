"""SMD: O(d) hypernetwork against explicit d x d matrices, bounds, initialisation, the
SMDNetwork call and its placements (the shared-backbone ``output`` placement included)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm_smd.nn.smd import Hypernetwork, LatentGenerator, SMDNetwork
from ldm_smd.nn.unet import UNetModel
from ldm_smd.rng import row_generators


def _randomise(hn: Hypernetwork, seed: int = 0) -> Hypernetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return hn


def _explicit(hn: Hypernetwork, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Test-only reference: build every M_l = v v^T + softplus(s) I (d x d) per position."""
    spatial = h.dim() == 4
    hp = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]) if spatial else h
    zp = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) if spatial else z
    hp, zp = hp.double(), zp.double()
    d = hn.latent_dim
    r = hp @ hn.A.double().T + hn.a.double()
    eye = torch.eye(d, dtype=torch.float64)
    for layer in range(hn.num_layers):
        rows = slice(layer * d, (layer + 1) * d)
        v = zp @ hn.W[rows].double().T + hn.w[rows].double()
        if hn.bound == "tanh":
            v = torch.tanh(v) / math.sqrt(d)
        m = v[:, :, None] * v[:, None, :] + F.softplus(hn.s[layer].double()) * eye
        r = (m @ r[:, :, None])[:, :, 0]
    out = hp + r @ hn.B.double().T + hn.b.double()
    if spatial:
        out = out.reshape(h.shape[0], h.shape[2], h.shape[3], h.shape[1]).permute(0, 3, 1, 2)
    return out


@pytest.mark.parametrize("bound", ["tanh", "none"])
@pytest.mark.parametrize("spatial", [True, False])
def test_od_hypernetwork_equals_explicit_matrices(bound, spatial):
    hn = _randomise(Hypernetwork(channels=6, latent_dim=10, num_layers=3, bound=bound))
    assert hn.B.abs().sum() > 0
    g = torch.Generator().manual_seed(1)
    shape_h, shape_z = ((2, 6, 3, 4), (2, 10, 3, 4)) if spatial else ((5, 6), (5, 10))
    h, z = torch.randn(shape_h, generator=g), torch.randn(shape_z, generator=g)
    out = hn(h, z)
    ref = _explicit(hn, h, z)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel <= 1e-5, rel
    assert not torch.allclose(out, h)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
def test_bounded_eigenvalues(scale):
    d = 12
    hn = _randomise(Hypernetwork(channels=4, latent_dim=d, num_layers=2, bound="tanh"), seed=3)
    z = torch.randn(64, d, generator=torch.Generator().manual_seed(4)) * scale
    v_all = hn.vectors(z).double()
    for layer in range(2):
        v = v_all[:, layer * d:(layer + 1) * d]
        sp = F.softplus(hn.s[layer].double())
        m = v[:, :, None] * v[:, None, :] + sp * torch.eye(d, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(m)
        assert (eig > 0).all()
        assert (eig <= 1 + sp + 1e-9).all()


def test_unbounded_reference_form_is_not_bounded():
    d = 12
    hn = _randomise(Hypernetwork(channels=4, latent_dim=d, num_layers=1, bound="none"), seed=3)
    v = hn.vectors(torch.randn(8, d) * 1e3).double()
    top = (v * v).sum(1) + F.softplus(hn.s[0].double())  # largest eigenvalue of v v^T + sI
    assert (top > 1 + F.softplus(hn.s[0].double())).any()


def _backbone(**kw):
    cfg = dict(in_channels=2, out_channels=2, model_channels=16, channel_mult=[1, 2],
               num_res_blocks=1, attention_resolutions=[2], num_heads=2)
    cfg.update(kw)
    return UNetModel(**cfg)


def _smd(seed=0, **kw):
    torch.manual_seed(seed)
    net = SMDNetwork(backbone=_backbone(), **{"latent_dim": 8, **kw})
    torch.nn.init.normal_(net.backbone.out[2].weight, std=0.1)  # the UNet's is zero-initialised
    return net


X = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(7))
T = torch.tensor([0, 10, 999])


def test_output_shape_and_seeded_determinism():
    net = _smd()
    a = net(X, T, torch.Generator().manual_seed(5))
    b = net(X, T, torch.Generator().manual_seed(5))
    assert a.shape == X.shape
    assert torch.equal(a, b)


def test_different_eta_gives_different_output():
    net = _smd()
    a = net(X, T, torch.Generator().manual_seed(5))
    b = net(X, T, torch.Generator().manual_seed(6))
    assert not torch.allclose(a, b)
    eta = torch.randn_like(X)
    torch.testing.assert_close(net(X, T, eta=eta), net(X, T, torch.Generator(), eta=eta))


def test_zero_init_equals_backbone_exactly_and_starves_the_latent():
    """hypernet_init="zero": the wrapped backbone is unchanged, and (the measured cost) the latent
    generator and W receive exactly zero gradient while B = 0."""
    net = _smd(hypernet_init="zero")
    for hn in net.hypernets.values():
        assert torch.count_nonzero(hn.B) == 0 and torch.count_nonzero(hn.b) == 0
    out = net(X, T, torch.Generator().manual_seed(1))
    assert torch.equal(out, net.backbone(X, T))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        if name.startswith("generator.") or name.endswith((".W", ".w", ".s", ".A", ".a")):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert torch.count_nonzero(net.hypernets["output"].B.grad) > 0


def test_default_init_is_the_authors():
    """nn.Linear's init for every map (uniform within 1/sqrt(fan_in), biases too), s ~ N(0, 1)."""
    torch.manual_seed(0)
    hn = Hypernetwork(channels=1000, latent_dim=800, num_layers=2)
    for name, fan_in in (("A", 1000), ("a", 1000), ("W", 800), ("w", 800), ("B", 800),
                         ("b", 800)):
        p = getattr(hn, name).detach()
        bound = 1 / math.sqrt(fan_in)
        assert p.abs().max() <= bound, name
        # uniform on (-bound, bound): mean 0, std bound / sqrt(3)
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name
        assert abs(p.mean().item()) < 0.1 * bound, name
    s = Hypernetwork(channels=1, latent_dim=1, num_layers=2000).s.detach()
    assert abs(s.mean().item()) < 0.15 and abs(s.std().item() - 1) < 0.1
    net = _smd()
    assert all(torch.count_nonzero(h.B) > 0 for h in net.hypernets.values())
    # the authors' form moves the output at once: eta matters from the first step
    assert not torch.allclose(net(X, T, torch.Generator().manual_seed(1)),
                              net(X, T, torch.Generator().manual_seed(2)))


def test_per_row_generators_make_rows_batch_independent():
    net = _smd()
    full = net(X, T, row_generators(11, 0, 3))
    last = net(X[2:], T[2:], row_generators(11, 2, 1))
    torch.testing.assert_close(full[2:], last, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-row"):
        net(X, T, row_generators(11, 0, 2))


@pytest.mark.parametrize("placement", ["input_output", "every_level"])
@pytest.mark.parametrize("bound", ["tanh", "none"])
def test_every_placement_runs_and_gradients_reach_everything(placement, bound):
    net = _smd(placement=placement, hypernet_bound=bound, hypernet_layers=2)
    expected = {"input", "output"} if placement == "input_output" else set(
        net.backbone.modulation_sites)
    assert set(net.hypernets) == expected
    out = net(X, T, torch.Generator().manual_seed(0))
    assert out.shape == X.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    for name in ("generator.conv_in.weight", "generator.conv_out.weight",
                 "generator.enc0.out_layers.3.weight", "hypernets.input.A", "hypernets.input.a",
                 "hypernets.input.W", "hypernets.input.w", "hypernets.input.s",
                 "hypernets.output.B", "hypernets.output.b",
                 "backbone.input_blocks.0.0.weight", "backbone.out.2.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_every_level_pools_latent_to_site_resolution():
    net = _smd(placement="every_level")
    seen = {}
    for site, hn in net.hypernets.items():
        original = hn.modulate

        def record(h, v, site=site, original=original):
            seen[site] = (tuple(h.shape[2:]), tuple(v.shape[2:]))
            return original(h, v)

        hn.modulate = record
    net(X, T, torch.Generator().manual_seed(0))
    assert seen == {"input": ((8, 8), (8, 8)), "level_0": ((8, 8), (8, 8)),
                    "level_1": ((4, 4), (4, 4)), "output": ((8, 8), (8, 8))}


@pytest.mark.parametrize("kw", [
    {"placement": "every_level"},                  # z computed, then W (the cheaper here)
    {"placement": "output", "latent_dim": 32},     # the head folded into W (the cheaper here)
    {"placement": "input_output", "generator_global_context": True, "hypernet_bound": "none"},
])
def test_fused_vectors_match_per_site_hypernetworks(kw):
    """SMDNetwork computes all sites' vectors at once, with the generator's linear head folded
    into W; the result equals each site's forward on z = g(eta, x_t, t)."""
    net = _smd(**kw)
    if net.generator.global_proj is not None:
        torch.nn.init.normal_(net.generator.global_proj.weight)  # a per-row bias that matters
    eta = torch.randn_like(X)
    z = net.latent(X, T, eta=eta)

    def per_site(h, site):
        if site not in net.hypernets:
            return h
        stride = net.site_strides[site]
        zs = F.avg_pool2d(z, stride) if stride > 1 else z
        return net.hypernets[site](h, zs)

    ref = net.backbone(X, T, modulation=per_site)
    torch.testing.assert_close(net(X, T, eta=eta), ref, rtol=1e-5, atol=1e-6)


def test_vector_network_equals_its_hypernetwork_on_the_latent():
    from ldm_smd.nn.mlp import MLPDenoiser

    torch.manual_seed(0)
    net = SMDNetwork(backbone=MLPDenoiser(dim=3, hidden=16, depth=2, time_embed_dim=8),
                     latent_dim=5, placement="output")
    x, t = torch.randn(4, 3), torch.tensor([0, 3, 7, 9])
    eta = torch.randn_like(x)
    z = net.latent(x, t, eta=eta)
    ref = net.backbone(x, t, modulation=lambda h, site: net.hypernets[site](h, z)
                       if site in net.hypernets else h)
    torch.testing.assert_close(net(x, t, eta=eta), ref, rtol=1e-5, atol=1e-6)


def test_large_inputs_stay_finite_while_the_bounded_modulation_acts():
    """Inputs 1000x too large: the bounded SMD (default init, B != 0) stays finite, its vectors
    keep |v_l| <= 1, and the modulation still moves the output, differently per eta draw."""
    net = _smd(hypernet_bound="tanh")
    big = X * 1e3
    outs = [net(big, T, torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    assert all(torch.isfinite(out).all() for out in outs)
    plain = net.backbone(big, T)
    assert torch.isfinite(plain).all()
    assert (outs[0] - plain).abs().max() > 1e-2 * plain.abs().max()  # the SMD part matters
    assert not torch.allclose(outs[0], outs[1])  # and depends on eta
    eta = torch.randn(big.shape, generator=torch.Generator().manual_seed(0))
    for v_all in net.site_vectors(eta, big, T).values():
        assert v_all.unflatten(1, (2, 8)).norm(dim=2).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("path", ["norm_out", "act_out", "conv_out", "enc0.in_layers.1"])
def test_latent_generator_runs_its_declared_head(path):
    torch.manual_seed(0)
    gen = LatentGenerator(in_channels=2, latent_dim=5, width=8)
    torch.nn.init.normal_(gen.enc0.out_layers[3].weight, std=0.3)  # zero-initialised
    eta = torch.randn(X.shape, generator=torch.Generator().manual_seed(1))
    before = gen(eta, X, T)
    parent, _, name = path.rpartition(".")  # setattr replaces a Sequential's "1" as well
    setattr(gen.get_submodule(parent), name,
            torch.nn.Conv2d(24, 5, 1) if name == "conv_out" else torch.nn.Identity())
    assert not torch.allclose(gen(eta, X, T), before, atol=1e-4)


def test_networks_declare_whether_they_draw_eta():
    from ldm_smd.diffusion.multi_eta import draws_eta
    from ldm_smd.nn.mlp import MLPDenoiser

    assert SMDNetwork.draws_eta is True and draws_eta(_smd())
    assert not draws_eta(UNetModel) and not draws_eta(MLPDenoiser(dim=2))


def test_default_generator_width_and_shapes():
    net = SMDNetwork(backbone=_backbone(model_channels=32))
    assert net.generator.width == 8
    z = net.latent(X, T, torch.Generator().manual_seed(0))
    assert z.shape == (3, 100, 8, 8)
    gen = LatentGenerator(in_channels=2, latent_dim=5, width=4, spatial=False)
    assert gen(torch.randn(3, 2), torch.randn(3, 2), T).shape == (3, 5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"placement": "everywhere"}, "everywhere"),
        ({"hypernet_bound": "sigmoid"}, "sigmoid"),
        ({"hypernet_init": "xavier"}, "xavier"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"hypernet_layers": 0}, "hypernet_layers"),
        ({"generator_width": 0}, "generator_width"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SMDNetwork(backbone=_backbone(), **kw)


def test_backbone_without_sites_rejected():
    with pytest.raises(ValueError, match="modulation_sites"):
        SMDNetwork(backbone=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("placement", ["output", "input_output", "every_level"])
def test_num_eta_samples_rows_equal_separate_calls(placement):
    """M draws in one call: row i + m * B equals a call with draw m alone, whichever placement
    (with "output" the backbone ran once for all M)."""
    net = _smd(placement=placement)
    M, B = 3, X.shape[0]
    eta = torch.randn((M * B, *X.shape[1:]), generator=torch.Generator().manual_seed(9))
    joint = net(X, T, eta=eta, num_eta_samples=M)
    assert joint.shape == (M * B, *X.shape[1:])
    for m in range(M):
        alone = net(X, T, eta=eta[m * B:(m + 1) * B])
        torch.testing.assert_close(joint[m * B:(m + 1) * B], alone, rtol=1e-5, atol=1e-6)
    # seeded draws: per-row generators give each row M consecutive draws of its own generator
    a = net(X, T, row_generators(4, 0, B), num_eta_samples=M)
    b = net(X[1:], T[1:], row_generators(4, 1, B - 1), num_eta_samples=M)
    torch.testing.assert_close(a.reshape(M, B, -1)[:, 1:], b.reshape(M, B - 1, -1), rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(a[:B], a[B:2 * B])


def test_output_placement_runs_the_backbone_once_for_all_draws():
    net = _smd(placement="output")
    assert set(net.hypernets) == {"output"}
    calls = []
    hook = net.backbone.input_blocks[0].register_forward_hook(
        lambda mod, inp, out: calls.append(out.shape[0]))
    net(X, T, torch.Generator().manual_seed(0), num_eta_samples=4)
    hook.remove()
    assert calls == [X.shape[0]]
    net = _smd(placement="input_output")
    hook = net.backbone.input_blocks[0].register_forward_hook(
        lambda mod, inp, out: calls.append(out.shape[0]))
    net(X, T, torch.Generator().manual_seed(0), num_eta_samples=4)
    hook.remove()
    assert calls == [X.shape[0], 4 * X.shape[0]]


def test_global_context_adds_one_eta_dependent_vector_at_every_position():
    """generator_global_context: z gains, at every position alike, a map of the mean of the
    half-resolution features, so a change of eta anywhere moves z everywhere by content."""
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 9])
    torch.manual_seed(0)
    gen = LatentGenerator(in_channels=2, latent_dim=4, width=8, global_context=True)
    assert LatentGenerator(in_channels=2, latent_dim=4, width=8).global_proj is None
    deltas = []
    for seed in (1, 2):
        eta = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            z = gen(eta, x, t)
            saved = [p.clone() for p in gen.global_proj.parameters()]
            for p in gen.global_proj.parameters():
                p.zero_()
            local = gen(eta, x, t)
            for p, v in zip(gen.global_proj.parameters(), saved, strict=True):
                p.copy_(v)
        delta = z - local
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(delta, delta[..., :1, :1].expand_as(delta))  # one per channel
        deltas.append(delta[..., 0, 0])
    assert not torch.allclose(deltas[0], deltas[1])  # it depends on eta
