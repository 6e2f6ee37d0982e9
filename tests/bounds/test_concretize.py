"""The hand-written backward of the concretisation (``propagate._Concretize``) against finite
differences: ``torch.autograd.gradcheck`` in float64, for the shared equation (one exact
equation, both bounds) and a separate lower and upper equation, with respect to every input."""

from __future__ import annotations

import pytest
import torch

from robnet_svc.bounds.propagate import _Concretize


def _away_from_zero(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Entries of magnitude in [0.1, 1.1) with random signs: ``|coef|`` is differentiable there,
    and finite differences of step 1e-6 never cross 0."""
    magnitude = 0.1 + torch.rand(*shape, dtype=torch.float64, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    return magnitude * sign


@pytest.mark.parametrize("shared", [True, False])
def test_concretisation_backward_matches_finite_differences(shared):
    g = torch.Generator().manual_seed(0)
    b, k, n = 2, 3, 4
    lo_coef = _away_from_zero(b, k, n, generator=g).requires_grad_()
    lo_const = torch.randn(b, n, dtype=torch.float64, generator=g).requires_grad_()
    up_coef = None if shared else _away_from_zero(b, k, n, generator=g).requires_grad_()
    up_const = None if shared else torch.randn(b, n, dtype=torch.float64, generator=g).requires_grad_()
    mid = torch.randn(b, k, dtype=torch.float64, generator=g).requires_grad_()
    rad = torch.rand(b, k, dtype=torch.float64, generator=g).add(0.05).requires_grad_()
    inputs = (lo_coef, lo_const, up_coef, up_const, mid, rad)
    assert torch.autograd.gradcheck(_Concretize.apply, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_concretisation_backward_with_one_output_used():
    """Training uses the lower bound only: the other output's gradient arrives as zeros
    (autograd materialises it before calling the hand-written backward)."""
    g = torch.Generator().manual_seed(1)
    coef = _away_from_zero(2, 3, 4, generator=g).requires_grad_()
    const = torch.randn(2, 4, dtype=torch.float64, generator=g).requires_grad_()
    mid = torch.randn(2, 3, dtype=torch.float64, generator=g).requires_grad_()
    rad = torch.rand(2, 3, dtype=torch.float64, generator=g).requires_grad_()
    for pick in (0, 1):
        assert torch.autograd.gradcheck(lambda *a: _Concretize.apply(*a)[pick], (coef, const, None, None, mid, rad),
                                        eps=1e-6, atol=1e-8, rtol=1e-6)
