"""``nn.Conv1d/2d`` (any stride, padding, dilation, groups, padding mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robnet_svc.bounds.ops.base import AffineRule


_FOLD_MAX_IN_CHANNELS = 3  # Lᵀ as a matrix product and ``fold`` up to this many input channels
#: A pass goes channels-last when most of its 2-D convolutions that read at least this many
#: channels vote for it (``Frame.prefers_channels_last``); one reading a single channel has the
#: same memory in both layouts and abstains. oneDNN's channels-last convolutions beat its NCHW
#: ones at every width measured on one CPU core: on 1,024 images, 4×4 kernels with stride 2,
#: reading 3 channels 11.4 vs 7.9 ms, 8 channels 10.2 vs 7.5, 16 channels 20.8 vs 14.9, 32
#: channels 24.0 vs 16.9 (one channel 7.4 vs 7.4). Stop 30 had measured no gain for
#: DM-small (3, 16) from the layout because its flatten copied every row back to NCHW; the SSIP
#: pass now applies the dense layer to the channels-last rows (``propagate._FlattenedDense``).
CHANNELS_LAST_MIN = 2
#: The threshold for the back-substitution methods whose forward pass is cheap, full CROWN
#: (``rsip``) and training's ``rsip-ibp``, whose time goes to Λ's transposed convolutions:
#: channels-last ÷ NCHW measured 1.04 on DM-small and 1.07 on MRI-32 for ``rsip`` (batch 8, five
#: repeats alternating), 1.10 on MRI-32 and 1.17 on MRI-64 for the ``rsip-ibp`` training step
#: (batch 64, 10–16 alternating), so their narrow networks keep NCHW; the wide ones (DM-medium)
#: go channels-last. ``rsip-ssip``, whose SSIP pass gains, and certification's ``rsip-ibp`` (the
#: ordered methods share a layout, ``methods.RSIP``) keep ``CHANNELS_LAST_MIN``; certification's
#: ``rsip`` computes the ``rsip-ibp`` and ``ibp`` bounds it keeps in that layout too.
CHANNELS_LAST_MIN_FULL_CROWN = 32


class ConvRule(AffineRule):
    """Convolution: ``|L|`` is the convolution with ``|weight|`` (exact for zero padding; with
    reflect/replicate/circular padding a pixel can meet the kernel twice and this is a sound
    over-approximation of ``|J|``); ``Lᵀ`` is ``conv_transpose2d`` (zero padding given as
    numbers), the generic VJP otherwise."""

    def layout_vote(self, min_channels: int) -> bool | None:
        """This convolution's vote on the pass's layout on the CPU (``Frame.prefers_channels_last``):
        True for a 2-D convolution reading at least ``min_channels`` channels (``CHANNELS_LAST_MIN``
        by default), where oneDNN's channels-last kernels beat its NCHW ones; False for another
        2-D convolution reading more than one channel, or a 1-D or 3-D one; None (no vote) for a
        2-D convolution reading one channel, whose input is the same in both layouts."""
        m = self.call.module
        if m.weight.dim() != 4:
            return False
        if m.in_channels == 1:
            return None
        return m.in_channels >= min_channels

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
