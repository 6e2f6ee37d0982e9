"""The hand-written backward passes of the steps at each activation (``propagate._HalfSums``,
``_LowerUpper``, ``_RelaxBackward``) against finite differences (``gradcheck`` in float64) and
against autograd of the plain expressions they replace, including where Λ is exactly 0 (the
kink of ``Λ⁺``, where both must take relu's zero gradient) and with one output unused."""

from __future__ import annotations

import pytest
import torch

from robnet_svc.bounds.propagate import _HalfSums, _LowerUpper, _RelaxBackward, row_dot


def _away_from_zero(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Magnitudes in [0.1, 1.1) with random signs: finite differences never cross ``Λ⁺``'s kink."""
    magnitude = 0.1 + torch.rand(*shape, dtype=torch.float64, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    return magnitude * sign


def _plain_half_sums(lo, up, hl, hu):
    half_up = up * hu
    return torch.addcmul(half_up, hl, lo), torch.addcmul(half_up, hl, lo, value=-1.0)


def _plain_relax_backward(lam, lower_slope, upper_slope, lower_bias, upper_bias):
    up_s = upper_slope.unsqueeze(1)
    pos = torch.relu(lam)
    lam_in = torch.addcmul(lam * up_s, pos, lower_slope.unsqueeze(1) - up_s)
    return lam_in, row_dot(lam, upper_bias) + row_dot(pos, lower_bias - upper_bias)


SHAPES = [(4,), (2, 3, 3)]  # a flat layer's neurons, an image-shaped node


@pytest.mark.parametrize("shape", SHAPES)
def test_half_sums_backward_matches_finite_differences(shape):
    g = torch.Generator().manual_seed(0)
    b, k = 2, 3
    lo, up = (torch.randn(b, k, *shape, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    hl, hu = (torch.rand(b, 1, *shape, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(_HalfSums.apply, (lo, up, hl, hu), eps=1e-6, atol=1e-8, rtol=1e-6)
    for pick in (0, 1):  # one output unused (autograd passes zeros for its gradient)
        assert torch.autograd.gradcheck(lambda *a: _HalfSums.apply(*a)[pick], (lo, up, hl, hu),
                                        eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lower_upper_backward_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    c, r = (torch.randn(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(_LowerUpper.apply, (c, r), eps=1e-6, atol=1e-8, rtol=1e-6)
    for pick in (0, 1):
        assert torch.autograd.gradcheck(lambda *a: _LowerUpper.apply(*a)[pick], (c, r), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_relax_backward_backward_matches_finite_differences(shape):
    g = torch.Generator().manual_seed(2)
    b, s = 2, 3
    lam = _away_from_zero(b, s, *shape, generator=g).requires_grad_()
    slopes_biases = [torch.randn(b, *shape, dtype=torch.float64, generator=g).requires_grad_() for _ in range(4)]
    inputs = (lam, *slopes_biases)
    assert torch.autograd.gradcheck(_RelaxBackward.apply, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    for pick in (0, 1):
        assert torch.autograd.gradcheck(lambda *a: _RelaxBackward.apply(*a)[pick], inputs,
                                        eps=1e-6, atol=1e-8, rtol=1e-6)


def _grads(fn, inputs, out_grads):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    torch.autograd.backward(outs, out_grads)
    return [o.detach() for o in outs], [t.grad for t in inputs]


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_steps_equal_autograd_of_the_plain_expressions(shape):
    """Values and every input's gradient, with exact zeros in Λ and in the slopes (stable
    neurons), as the engine produces them."""
    g = torch.Generator().manual_seed(3)
    b, rows = 3, 4
    lam = torch.randn(b, rows, *shape, dtype=torch.float64, generator=g)
    lam[:, :, 0] = 0.0  # the kink of Λ⁺
    params = [torch.randn(b, *shape, dtype=torch.float64, generator=g) for _ in range(4)]
    params[0][0] = 0.0  # a dead neuron's slopes
    grads = (torch.randn(b, rows, *shape, dtype=torch.float64, generator=g),
             torch.randn(b, rows, dtype=torch.float64, generator=g))
    fused = _grads(_RelaxBackward.apply, (lam, *params), grads)
    plain = _grads(_plain_relax_backward, (lam, *params), grads)
    for x, y in zip(fused[0] + fused[1], plain[0] + plain[1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)

    lo, up = torch.randn(b, rows, *shape, dtype=torch.float64, generator=g), lam
    hl, hu = params[0].unsqueeze(1), params[1].unsqueeze(1).abs()
    out_grads = (grads[0], torch.randn(b, rows, *shape, dtype=torch.float64, generator=g))
    fused = _grads(_HalfSums.apply, (lo, up, hl, hu), out_grads)
    plain = _grads(_plain_half_sums, (lo, up, hl, hu), out_grads)
    for x, y in zip(fused[0] + fused[1], plain[0] + plain[1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_relax_backward_on_a_channels_last_view():
    """The engine calls it on Λ permuted into memory order; the results match an NCHW call."""
    g = torch.Generator().manual_seed(4)
    lam = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, generator=g)
    params = [torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=g) for _ in range(4)]
    grads = (torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, generator=g), torch.randn(2, 3, dtype=torch.float64, generator=g))
    nchw = _grads(_RelaxBackward.apply, (lam, *params), grads)
    order, rows = (0, 2, 3, 1), (0, 1, 3, 4, 2)
    last = _grads(_RelaxBackward.apply,
                  (lam.permute(rows).contiguous(), *(p.permute(order).contiguous() for p in params)),
                  (grads[0].permute(rows).contiguous(), grads[1]))
    torch.testing.assert_close(last[0][0], nchw[0][0].permute(rows))
    torch.testing.assert_close(last[0][1], nchw[0][1])
    torch.testing.assert_close(last[1][0], nchw[1][0].permute(rows))
    for x, y in zip(last[1][1:], nchw[1][1:]):
        torch.testing.assert_close(x, y.permute(order))
