"""Perturbation plugins (SPEC §2): the affine descriptions match the formulas exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from robnet_svc.errors import RobnetError
from robnet_svc.perturbations import DenseAffineSet, IdentityAffineSet
from robnet_svc.perturbations.bias_field import BiasField, Brightness, Contrast, bias_field_basis
from robnet_svc.perturbations.linf import Linf
from robnet_svc.plugins import load_registry

DT = torch.float64
MODES = ("mult", "add", "both")


def _images(b=2, c=3, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=DT)


def _explicit_basis(h, w, order):
    """Reference basis with Python loops: b[t,g,i,j] = (i/(H-1))^t (j/(W-1))^g."""
    out = torch.zeros(order + 1, order + 1, h, w, dtype=DT)
    for t, g, i, j in itertools.product(range(order + 1), range(order + 1), range(h), range(w)):
        y = i / (h - 1) if h > 1 else 0.0
        x = j / (w - 1) if w > 1 else 0.0
        out[t, g, i, j] = y**t * x**g
    return out.reshape(-1, h, w)


@pytest.mark.parametrize("order", range(5))
@pytest.mark.parametrize("hw", [(5, 7), (1, 4), (3, 1), (32, 32)])
def test_basis_values_and_count(order, hw):
    h, w = hw
    basis = bias_field_basis(h, w, order, torch.device("cpu"), DT)
    assert basis.shape == ((order + 1) ** 2, h, w)
    torch.testing.assert_close(basis, _explicit_basis(h, w, order), rtol=1e-12, atol=1e-12)


def test_basis_has_16_terms_for_order_3_and_includes_both_corners():
    basis = bias_field_basis(6, 9, 3, torch.device("cpu"), DT)
    assert basis.shape[0] == 16
    # top-left corner: coordinates (0, 0): only the constant term is non-zero
    assert basis[:, 0, 0].tolist() == [1.0] + [0.0] * 15
    # bottom-right corner: coordinates (1, 1): every term is exactly 1
    assert basis[:, -1, -1].tolist() == [1.0] * 16
    # b^{1,0} is the row coordinate, b^{0,1} the column coordinate (index = t*4 + g)
    assert basis[4, :, 0].tolist() == [i / 5 for i in range(6)]
    assert basis[1, 0, :].tolist() == [j / 8 for j in range(9)]


def test_basis_follows_device_and_dtype():
    x = _images().float()
    aset = BiasField(0.1).affine_set(x)
    assert aset.weights.dtype == torch.float32 and aset.lower.dtype == torch.float32
    if torch.cuda.is_available():
        aset = BiasField(0.1, mode="both").affine_set(x.cuda())
        assert aset.weights.is_cuda and aset.lower.is_cuda and aset.offset.is_cuda


@pytest.mark.parametrize("order", range(5))
def test_multiplicative_field_stays_within_one_plus_minus_two_eps(order):
    eps = 0.3
    x = torch.ones(1, 1, 9, 11, dtype=DT)  # weights are then the field's basis itself
    aset = BiasField(eps, order=order).affine_set(x)
    coeffs = aset.sample(2000, torch.Generator().manual_seed(order))
    field = aset.images(coeffs)
    assert field.min() >= 1 - 2 * eps - 1e-12 and field.max() <= 1 + 2 * eps + 1e-12
    # the box: constant term [1-eps, 1+eps], the other (order+1)^2 - 1 terms [-eps/s, eps/s]
    s = max((order + 1) ** 2 - 1, 1)
    assert aset.lower[0, 0] == 1 - eps and aset.upper[0, 0] == 1 + eps
    torch.testing.assert_close(aset.upper[0, 1:], torch.full(((order + 1) ** 2 - 1,), eps / s, dtype=DT))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 1, 3])
def test_box_nominal_and_shapes(mode, order):
    eps, t = 0.2, (order + 1) ** 2
    x = _images()
    p = BiasField(eps, order=order, mode=mode, coef_scale=4.0)
    aset = p.affine_set(x)
    k = t * (2 if mode == "both" else 1)
    assert isinstance(aset, DenseAffineSet)
    assert aset.weights.shape == (2, k, 3, 5, 7) and aset.offset.shape == (2, 3, 5, 7)
    assert aset.lower.shape == aset.upper.shape == aset.nominal.shape == (2, k)
    assert p.num_coeffs((3, 5, 7)) == k and len(p.coeff_names((3, 5, 7))) == k
    half = torch.full((t,), eps / 4.0, dtype=DT)
    half[0] = eps
    mult_nominal = torch.zeros(t, dtype=DT)
    mult_nominal[0] = 1.0
    nominal = {"mult": mult_nominal, "add": torch.zeros(t, dtype=DT),
               "both": torch.cat([mult_nominal, torch.zeros(t, dtype=DT)])}[mode]
    half = half.repeat(2 if mode == "both" else 1)
    for row in range(2):
        torch.testing.assert_close(aset.nominal[row], nominal)
        torch.testing.assert_close(aset.lower[row], nominal - half)
        torch.testing.assert_close(aset.upper[row], nominal + half)
    assert ((aset.lower <= aset.nominal) & (aset.nominal <= aset.upper)).all()


def test_coefficient_names():
    assert BiasField(0.1, order=1, mode="both").coeff_names((3, 8, 8)) == [
        "m_t0_g0", "m_t0_g1", "m_t1_g0", "m_t1_g1", "a_t0_g0", "a_t0_g1", "a_t1_g0", "a_t1_g1"]
    assert BiasField(0.1, order=3).coeff_names((1, 4, 4))[6] == "m_t1_g2"
    assert BiasField(0.1, order=2, mode="add").coeff_names((1, 4, 4))[5] == "a_t1_g2"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", range(5))
def test_nominal_coefficients_reproduce_the_clean_image_exactly(mode, order):
    x = _images(seed=order)
    for dtype in (torch.float32, DT):
        aset = BiasField(0.25, order=order, mode=mode).affine_set(x.to(dtype))
        assert torch.equal(aset.images(aset.nominal), x.to(dtype))
        assert torch.equal(aset.images(aset.nominal.unsqueeze(1)), x.to(dtype).unsqueeze(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 2, 3])
def test_images_equal_the_explicit_formula(mode, order):
    x = _images()
    aset = BiasField(0.3, order=order, mode=mode).affine_set(x)
    coeffs = aset.sample(50, torch.Generator().manual_seed(1))  # [B, S, k]
    basis = _explicit_basis(5, 7, order)  # [T, H, W]
    t = basis.shape[0]

    def field(a):  # a [B, S, T] -> [B, S, 1, H, W]
        return torch.einsum("bst,thw->bshw", a, basis).unsqueeze(2)

    clean = x.unsqueeze(1)
    expected = {
        "mult": lambda: clean * field(coeffs),
        "add": lambda: clean + field(coeffs),
        "both": lambda: clean * field(coeffs[..., :t]) + field(coeffs[..., t:]),
    }[mode]()
    torch.testing.assert_close(aset.images(coeffs), expected, rtol=1e-12, atol=1e-12)


def test_brightness_and_contrast_are_zero_order_fields():
    x = _images()
    b = Brightness(0.1).affine_set(x)
    c = Contrast(0.1).affine_set(x)
    assert b.num_coeffs == c.num_coeffs == 1
    assert (b.lower.squeeze(1).tolist(), b.upper.squeeze(1).tolist()) == ([-0.1, -0.1], [0.1, 0.1])
    assert (c.lower.squeeze(1).tolist(), c.upper.squeeze(1).tolist()) == ([0.9, 0.9], [1.1, 1.1])
    a = torch.tensor([[0.05], [-0.07]], dtype=DT)
    torch.testing.assert_close(b.images(a), x + a.view(2, 1, 1, 1))
    torch.testing.assert_close(c.images(a + 1), x * (a + 1).view(2, 1, 1, 1))
    assert Brightness(0.1).describe() == {"name": "brightness", "eps": 0.1, "clip": [0.0, 1.0]}
    with pytest.raises(RobnetError, match="has no option 'order'"):
        Brightness(0.1, order=2)


def _per_pixel_extremes(aset):
    """Max and min of ``W a + c`` for every pixel, each attained at its own box corner."""
    weights, _ = aset.dense()
    b, k = aset.lower.shape
    w = weights.reshape(b, k, -1).transpose(1, 2)  # [B, P, k]
    lo, hi = aset.lower.unsqueeze(1), aset.upper.unsqueeze(1)
    top = aset.images(torch.where(w >= 0, hi, lo)).reshape(b, w.shape[1], -1).diagonal(dim1=1, dim2=2)
    bottom = aset.images(torch.where(w >= 0, lo, hi)).reshape(b, w.shape[1], -1).diagonal(dim1=1, dim2=2)
    return bottom.reshape(b, *aset.image_shape), top.reshape(b, *aset.image_shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 1, 3])
def test_center_radius_is_sound_and_tight(mode, order):
    x = _images(h=4, w=5)
    aset = BiasField(0.3, order=order, mode=mode, clip=None).affine_set(x)
    centre, radius = aset.center_radius()
    assert centre.shape == radius.shape == x.shape and (radius >= 0).all()
    samples = aset.images(aset.sample(1000, torch.Generator().manual_seed(2)))
    assert (samples >= (centre - radius).unsqueeze(1) - 1e-12).all()
    assert (samples <= (centre + radius).unsqueeze(1) + 1e-12).all()
    bottom, top = _per_pixel_extremes(aset)  # the interval is attained, pixel by pixel
    torch.testing.assert_close(centre - radius, bottom, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(centre + radius, top, rtol=1e-12, atol=1e-12)
    if aset.num_coeffs <= 2:  # few corners: the sampled corners attain the interval itself
        torch.testing.assert_close(samples.amax(1), centre + radius, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(samples.amin(1), centre - radius, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_transpose_equals_dense_contraction(mode):
    x = _images()
    aset = BiasField(0.2, order=2, mode=mode).affine_set(x)
    lam = torch.randn(2, 4, 3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=DT)
    weights, offset = aset.dense()
    coef, const = aset.transpose(lam)
    torch.testing.assert_close(coef, torch.einsum("bschw,bkchw->bsk", lam, weights))
    torch.testing.assert_close(const, torch.einsum("bschw,bchw->bs", lam, offset))
    # and back-substitution then concretisation bounds lam·(W a + c) over the box
    values = torch.einsum("bschw,bnchw->bns", lam, aset.images(aset.sample(500)))
    assert (values >= aset.concretize(coef, const).unsqueeze(1) - 1e-10).all()
    assert (values <= aset.concretize(coef, const, upper=True).unsqueeze(1) + 1e-10).all()


def test_linf_identity_set():
    x = _images()
    p = Linf(0.05)
    aset = p.affine_set(x)
    assert isinstance(aset, IdentityAffineSet) and not aset.supports_dense
    assert aset.num_coeffs == p.num_coeffs((3, 5, 7)) == 105 and len(p.coeff_names((3, 5, 7))) == 105
    assert torch.equal(aset.lower, torch.full((2, 105), -0.05, dtype=DT)) and torch.equal(aset.upper, -aset.lower)
    assert torch.equal(aset.images(aset.nominal), x)
    a = aset.sample(7)
    torch.testing.assert_close(aset.images(a), x.unsqueeze(1) + a.reshape(2, 7, 3, 5, 7))
    centre, radius = aset.center_radius()
    torch.testing.assert_close(centre, x)
    torch.testing.assert_close(radius, torch.full_like(x, 0.05))
    lam = torch.randn(2, 4, 3, 5, 7, dtype=DT)
    coef, const = aset.transpose(lam)
    torch.testing.assert_close(coef, lam.reshape(2, 4, -1))
    torch.testing.assert_close(const, torch.einsum("bschw,bchw->bs", lam, x))
    with pytest.raises(RobnetError, match="linf"):
        aset.dense()


@pytest.mark.parametrize("cls", [BiasField, Brightness, Contrast, Linf])
def test_eps_argument_overrides_and_zero_gives_a_point(cls):
    x = _images()
    p = cls(0.1)
    point = p.affine_set(x, eps=0.0)
    assert torch.equal(point.lower, point.upper) and torch.equal(point.lower, point.nominal)
    assert torch.equal(point.images(point.sample(3)), x.unsqueeze(1).expand(2, 3, 3, 5, 7))
    wide, default = p.affine_set(x, eps=0.4), p.affine_set(x)
    torch.testing.assert_close((wide.upper - wide.lower), 4 * (default.upper - default.lower))
    with pytest.raises(RobnetError, match="eps"):
        p.affine_set(x, eps=-0.1)


@pytest.mark.parametrize("cls", [BiasField, Linf])
def test_clip_range_is_passed_on(cls):
    x = _images() * 3 - 1
    assert cls(0.1).affine_set(x).clip == (0.0, 1.0)
    assert cls(0.1, clip=None).affine_set(x).clip is None
    aset = cls(0.1, clip=(-1, 2)).affine_set(x)
    assert aset.clip == (-1.0, 2.0)
    clipped = aset.clipped(aset.images(aset.sample(10)))
    assert clipped.min() >= -1 and clipped.max() <= 2
    with pytest.raises(RobnetError, match="clip"):
        cls(0.1, clip=(1, 0))


def test_registry_lists_the_builtin_perturbations():
    registry = load_registry()
    for name, cls in [("bias-field", BiasField), ("brightness", Brightness), ("contrast", Contrast), ("linf", Linf)]:
        assert registry.perturbation(name) is cls
        assert registry.perturbations[name].dist == "robnet-svc"
    listed = {row["name"]: row for row in registry.listing()["perturbations"]}
    assert {"bias-field", "brightness", "contrast", "linf"} <= set(listed)
    assert all(listed[n]["description"] for n in ("bias-field", "brightness", "contrast", "linf"))


def test_options_are_read_from_strings_and_described():
    p = load_registry().perturbation("bias-field")("0.4", order="2", mode="both", coef_scale="3")
    assert (p.eps, p.order, p.mode, p.coef_scale) == (0.4, 2, "both", 3.0)
    assert p.describe() == {"name": "bias-field", "eps": 0.4, "clip": [0.0, 1.0],
                            "order": 2, "mode": "both", "coef_scale": 3.0}
    assert BiasField(0.1).describe()["order"] == 3 and BiasField(0.1).mode == "mult"


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.1, order=5), "order"),
    (dict(eps=0.1, order="three"), "order"),
    (dict(eps=0.1, mode="foo"), "mode"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-0.2), "eps"),
    (dict(eps="abc"), "eps"),
    (dict(eps=0.1, coef_scale=0), "coef_scale"),
    (dict(eps=0.1, coef_scale=-1), "coef_scale"),
    (dict(eps=0.1, colour="red"), "colour"),
])
def test_bad_options_raise_robnet_error(kwargs, match):
    with pytest.raises(RobnetError, match=match):
        BiasField(**kwargs)


def test_bad_images_raise_robnet_error():
    with pytest.raises(RobnetError, match=r"\[B, C, H, W\]"):
        BiasField(0.1).affine_set(torch.rand(3, 8, 8))
