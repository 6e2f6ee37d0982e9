"""``nn.Conv1d/2d`` (any stride, padding, dilation, groups, padding mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robnet_svc.bounds.ops.base import AffineRule


_FOLD_MAX_IN_CHANNELS = 3  # Lᵀ as a matrix product and ``fold`` up to this many input channels
#: A pass goes channels-last when most of its 2-D convolutions read at least this many channels
#: (``Frame.prefers_channels_last``). Measured on one CPU core, the same process alternating
#: layouts step by step, channels-last ÷ NCHW: DM-medium (convolutions reading 3, 32, 32, 64
#: channels) SSIP pass 0.82, training ssip 0.82, rsip-ibp and rsip-ssip 0.94; MRI-64 (1, 16, 32)
#: 0.94–1.10, DM-small (3, 16) 0.88–1.01, MRI-32 0.98–1.09: no clear gain.
CHANNELS_LAST_MIN = 32


class ConvRule(AffineRule):
    """Convolution: ``|L|`` is the convolution with ``|weight|`` (exact for zero padding; with
    reflect/replicate/circular padding a pixel can meet the kernel twice and this is a sound
    over-approximation of ``|J|``); ``Lᵀ`` is ``conv_transpose2d`` (zero padding given as
    numbers), the generic VJP otherwise."""

    @property
    def channels_last(self) -> bool:
        """This convolution's vote on the pass's layout on the CPU (``propagate._layout``): True
        for a 2-D convolution reading at least ``CHANNELS_LAST_MIN`` channels, where oneDNN's
        channels-last kernels beat its NCHW ones (with fewer, e.g. an RGB or grey image, they
        do not, and the layout costs a copy at the flatten); False for another 2-D convolution."""
        m = self.call.module
        return m.weight.dim() == 4 and m.in_channels >= CHANNELS_LAST_MIN

    def abs_linear(self, rad: Tensor) -> Tensor:
        m = self.call.module
        return m._conv_forward(rad, m.weight.abs(), None)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``L(x)``: the convolution without its bias (one op, not ``f(x) - f(0)``)."""
        m = self.call.module
        return m._conv_forward(x, m.weight, None)

    def bias(self, like: Tensor) -> Tensor:
        m = self.call.module
        if m.bias is None:
            return like.new_zeros((1, *self.call.out_shape))
        spatial = (1,) * (len(self.call.out_shape) - 1)
        return m.bias.reshape(1, -1, *spatial).expand(1, *self.call.out_shape)

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        m = self.call.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or m.weight.dim() != 4:
            return super().transpose(lam)
        in_hw = self.call.in_shapes[0][1:]
        out_hw = lam.shape[2:]
        # output_padding recovers the input size lost to the floor in the strided forward.
        extra = tuple(
            in_hw[d] - ((out_hw[d] - 1) * m.stride[d] - 2 * m.padding[d] + m.dilation[d] * (m.kernel_size[d] - 1) + 1)
            for d in range(2)
        )
        differentiable = torch.is_grad_enabled() and (lam.requires_grad or m.weight.requires_grad)
        if m.groups == 1 and m.in_channels <= _FOLD_MAX_IN_CHANNELS and not differentiable:
            # Λ·W per output pixel, then fold sums the overlapping windows: on one core about
            # 2.5x faster than conv_transpose2d into 1-3 channels (an image), which full CROWN
            # runs for every bounded neuron of every layer. Not under autograd: fold's
            # backward (im2col) is far slower than the transposed convolution's.
            cols = torch.matmul(m.weight.reshape(m.out_channels, -1).t(), lam.flatten(2))
            return (F.fold(cols, in_hw, m.kernel_size, m.dilation, m.padding, m.stride),)
        return (F.conv_transpose2d(lam, m.weight, None, m.stride, m.padding, extra, m.groups, m.dilation),)
