"""Random networks, perturbation sets and the sampled ground truth for bound property tests.

A hypothesis strategy draws a small *recipe* (family, sizes, which layers, a weight seed);
``build(recipe)`` turns it into an ``nn.Module`` in eval mode (fx-traceable, plain torch
layers). Weights come from a seeded torch generator so every example is reproducible
from its printed recipe: ``build(Recipe(family="cnn", ...))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import Tensor, nn

from robnet_svc.perturbations import AffineSet
from robnet_svc.perturbations.bias_field import BiasField, Brightness, Contrast
from robnet_svc.perturbations.linf import Linf

FAMILIES = ("mlp", "cnn", "residual")
#: families with the non-affine structural ops of issue 12 (not in FAMILIES: the exactness
#: tests draw from FAMILIES without ReLU and these are not affine even then)
OP_FAMILIES = ("maxpool", "product", "structural")
METHODS = ("ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip")
#: methods that need the dense affine description (forward symbolic): they refuse linf
DENSE_METHODS = ("ssip", "rsip-ssip")

SOUND_TOL = 1e-5  # relative to the scale of the margins (float32 rounding)
ORDER_TOL = 1e-6  # relative, SPEC §3

#: every perturbation configuration of the suite: id -> (class, options)
PERTURBATIONS = {
    **{f"bias-{mode}-o{order}": (BiasField, {"mode": mode, "order": order})
       for mode in ("mult", "add", "both") for order in range(4)},
    "brightness": (Brightness, {}),
    "contrast": (Contrast, {}),
    "linf": (Linf, {}),
}


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild one random network (printed by hypothesis on failure)."""

    family: str  # mlp | cnn | residual | maxpool | product | structural
    channels: int  # input channels C
    size: tuple[int, int]  # input H, W
    classes: int  # K
    width: int  # hidden units / channels
    relu: bool  # False: a purely affine network (exactness tests)
    norm: str  # "none" | "subdiv" | "muladd": normalisation by constants in front
    batchnorm: bool
    pad: bool  # ZeroPad2d (cnn / residual)
    pool: bool  # AvgPool2d (cnn / residual)
    stride: int  # of the first conv
    groups: bool  # grouped second conv
    dropout: bool  # Dropout / Identity layers (no-ops in eval mode)
    seed: int
    act: str = "relu"  # the activation where ``relu`` is True: a key of ACTIVATIONS


@st.composite
def recipes(draw, families=FAMILIES, relu=None, act="relu") -> Recipe:
    """A random network recipe; ``relu`` None draws it, True/False fixes it; ``act`` names the
    activation (a key of ``ACTIVATIONS``)."""
    family = draw(st.sampled_from(families))
    return Recipe(
        family=family,
        channels=draw(st.integers(1, 3)),
        size=(draw(st.integers(4, 7)), draw(st.integers(4, 7))),
        classes=draw(st.integers(2, 5)),
        width=draw(st.sampled_from([4, 6])),
        relu=draw(st.booleans()) if relu is None else relu,
        norm=draw(st.sampled_from(["none", "subdiv", "muladd"])),
        batchnorm=draw(st.booleans()),
        pad=draw(st.booleans()),
        pool=draw(st.booleans()),
        stride=draw(st.sampled_from([1, 2])),
        groups=draw(st.booleans()),
        dropout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        act=act,
    )


class Normalize(nn.Module):
    """Normalisation by constants, as exporters write it: ``(x - mean) / std`` or ``x * s + t``."""

    def __init__(self, channels: int, kind: str, gen: torch.Generator):
        super().__init__()
        self.kind = kind
        shape = (1, channels, 1, 1)
        self.register_buffer("shift", torch.rand(shape, generator=gen) * 0.6 - 0.1)
        self.register_buffer("scale", torch.rand(shape, generator=gen) * 0.3 + 0.15)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "subdiv":
            return (x - self.shift) / self.scale
        return x * self.scale + self.shift


class Residual(nn.Module):
    """``act(x + body(x))`` or ``act(shortcut(x) + body(x))``: a two-tensor Add."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None, act: nn.Module):
        super().__init__()
        self.body, self.shortcut = body, shortcut if shortcut is not None else nn.Identity()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.body(x))


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights, biases and BatchNorm statistics (BN in eval mode is then a random affine map)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            m.weight.data = (torch.rand(m.weight.shape, generator=gen) * 2 - 1) * (1.5 / fan_in**0.5)
            m.bias.data = (torch.rand(m.bias.shape, generator=gen) * 2 - 1) * 0.3
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.data = torch.randn(n, generator=gen) * 0.3
            m.running_var.data = torch.rand(n, generator=gen) * 1.5 + 0.2
            m.weight.data = torch.randn(n, generator=gen)
            m.bias.data = torch.randn(n, generator=gen) * 0.3


class PreScaled(nn.Module):
    """``act(scale·x)``: puts the kinks of HardSigmoid/HardSwish (at ±3) inside the range of
    the random networks' pre-activations (about ±2)."""

    def __init__(self, act: nn.Module, scale: float):
        super().__init__()
        self.act, self.scale = act, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x * self.scale)


class Clamp(nn.Module):
    """``torch.clamp(x, min, max)`` as a function call (either bound may be None)."""

    def __init__(self, low: float | None, high: float | None):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.low, self.high)


class SiluProduct(nn.Module):
    """``x * sigmoid(x)`` written out (as ONNX exports SiLU): fused by the bound compiler."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class GeluErf(nn.Module):
    """GELU written as the legacy ONNX exporter writes it: fused by the bound compiler."""

    def forward(self, x: Tensor) -> Tensor:
        return x * (torch.erf(x / 1.4142135623730951) + 1.0) * 0.5


def _prelu(width: int, gen: torch.Generator) -> nn.Module:
    act = nn.PReLU(width)
    act.weight.data = torch.rand(width, generator=gen) * 2.4 - 0.6  # slopes in [-0.6, 1.8]
    return act


#: activation name -> factory(width, generator); every one must have a bound rule
ACTIVATIONS = {
    "relu": lambda w, g: nn.ReLU(),
    "relu6": lambda w, g: PreScaled(nn.ReLU6(), 4.0),
    "hardtanh": lambda w, g: nn.Hardtanh(-0.4, 0.7),
    "clamp-min": lambda w, g: Clamp(-0.3, None),
    "clamp-max": lambda w, g: Clamp(None, 0.4),
    "leaky-relu": lambda w, g: nn.LeakyReLU(0.1),
    "leaky-relu-steep": lambda w, g: nn.LeakyReLU(1.8),
    "leaky-relu-negative": lambda w, g: nn.LeakyReLU(-0.4),
    "prelu": _prelu,
    "hardsigmoid": lambda w, g: PreScaled(nn.Hardsigmoid(), 3.0),
    "hardswish": lambda w, g: PreScaled(nn.Hardswish(), 3.0),
    "sigmoid": lambda w, g: nn.Sigmoid(),
    "tanh": lambda w, g: nn.Tanh(),
    "elu": lambda w, g: nn.ELU(),
    "elu-steep": lambda w, g: nn.ELU(1.7),
    "softplus": lambda w, g: nn.Softplus(),
    "softplus-beta": lambda w, g: nn.Softplus(beta=3.0, threshold=2.0),
    "silu": lambda w, g: nn.SiLU(),
    "silu-product": lambda w, g: SiluProduct(),
    "gelu": lambda w, g: nn.GELU(),
    "gelu-erf": lambda w, g: GeluErf(),
}


def _act(r: Recipe, width: int = 1, gen: torch.Generator | None = None) -> nn.Module:
    if not r.relu:
        return nn.Identity()
    return ACTIVATIONS[r.act](width, gen if gen is not None else torch.Generator().manual_seed(r.seed))


def _noop(r: Recipe) -> list[nn.Module]:
    return [nn.Dropout(0.3), nn.Identity()] if r.dropout else []


def _spatial_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MaxPoolNet(nn.Module):
    """conv → act → MaxPool2d (random kernel, stride, padding, dilation, ceil_mode) → conv →
    act → MaxPool1d over the flattened rows (``F.max_pool1d``) → linear."""

    def __init__(self, r: Recipe, gen: torch.Generator):
        super().__init__()
        pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
        kernel, padding, dilation = pick(2, 3), pick(0, 1), pick(1, 1, 2)
        padding = min(padding, kernel // 2)
        if dilation * (kernel - 1) + 1 > min(r.size) + 2 * padding:
            dilation = 1
        self.pool = nn.MaxPool2d(kernel, stride=pick(1, 2), padding=padding, dilation=dilation, ceil_mode=r.groups)
        self.conv1 = nn.Conv2d(r.channels, r.width, 3, padding=1)
        self.act1, self.act2 = _act(r), _act(r)
        self.conv2 = nn.Conv2d(r.width, r.width, 1)
        self.k1d = pick(2, 3)
        with torch.no_grad():
            n = self._features(torch.zeros(1, r.channels, *r.size)).shape[1]
        self.fc = nn.Linear(n, r.classes)

    def _features(self, x: Tensor) -> Tensor:
        h = self.pool(self.act1(self.conv1(x)))
        h = self.act2(self.conv2(h)).flatten(2)  # [B, C, H*W]
        return F.max_pool1d(h, self.k1d, stride=1, padding=self.k1d // 2).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self._features(x))


class ProductNet(nn.Module):
    """Products of two perturbed tensors: a squeeze-excitation gate ``h * s`` (``s`` is
    ``[C, 1, 1]``, from a spatial mean), and ``h * g`` of two same-shape branches (as in
    ``x * sigmoid(x)``, with the activation of the recipe)."""

    def __init__(self, r: Recipe, gen: torch.Generator):
        super().__init__()
        c = r.width
        self.conv1 = nn.Conv2d(r.channels, c, 3, padding=1, stride=r.stride)
        self.gate = nn.Conv2d(c, c, 1)
        self.branch = nn.Conv2d(c, c, 3, padding=1)
        self.act = _act(r)
        h, w = (_spatial_out(s, 3, r.stride, 1) for s in r.size)
        self.fc = nn.Linear(c * h * w, r.classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv1(x))
        s = self.act(self.gate(torch.mean(h, dim=(2, 3), keepdim=True)))
        h = h * s
        h = h * self.branch(h)
        return self.fc(h.flatten(1))


class StructuralNet(nn.Module):
    """chunk → Concat of three perturbed blocks → channel shuffle (reshape, transpose, reshape) →
    slice → index_select → resize (nearest or bilinear) → sum over an axis → linear."""

    def __init__(self, r: Recipe, gen: torch.Generator):
        super().__init__()
        c = r.width
        self.conv1 = nn.Conv2d(r.channels, c, 3, padding=1)
        self.act = _act(r)
        h, w = r.size
        self.extra = nn.Conv2d(c // 2, 2, 1)
        self.register_buffer("index", torch.randint(0, w - 1, (w,), generator=gen))
        self.mode = "bilinear" if r.pool else "nearest"
        self.conv2 = nn.Conv2d(c + 2, 4, 3, padding=1)
        self.shape = (c + 2, h, w)
        self.fc = nn.Linear(4 * (2 * (h - 1)), r.classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv1(x))
        a, b = torch.chunk(h, 2, dim=1)
        h = torch.cat([b, self.extra(a), a], 1)
        n, hh, ww = self.shape
        h = torch.transpose(h.reshape(-1, 2, n // 2, hh, ww), 1, 2).reshape(-1, n, hh, ww)
        h = self.act(self.conv2(h))[:, :, 1:, :]  # slice rows
        h = torch.index_select(h, 3, self.index)
        h = F.interpolate(h, scale_factor=2, mode=self.mode)
        return self.fc(h.sum(dim=3).flatten(1))


_OP_NETS = {"maxpool": MaxPoolNet, "product": ProductNet, "structural": StructuralNet}


def build(r: Recipe) -> nn.Module:
    """The network of a recipe, eval mode, float32; input ``[B, C, H, W]``, output ``[B, K]``."""
    gen = torch.Generator().manual_seed(r.seed)
    c, (h, w) = r.channels, r.size
    layers: list[nn.Module] = []
    if r.norm != "none":
        layers.append(Normalize(c, r.norm, gen))
    if r.family in _OP_NETS:
        layers.append(_OP_NETS[r.family](r, gen))
    elif r.family == "mlp":
        layers.append(nn.Flatten())
        features = c * h * w
        for _ in range(2):
            layers += [nn.Linear(features, r.width)]
            layers += [nn.BatchNorm1d(r.width)] if r.batchnorm else []
            layers += [_act(r, r.width, gen), *_noop(r)]
            features = r.width
        layers.append(nn.Linear(features, r.classes))
    else:
        width = r.width
        layers += [nn.Conv2d(c, width, 3, stride=r.stride, padding=1), _act(r, width, gen)]
        h, w = _spatial_out(h, 3, r.stride, 1), _spatial_out(w, 3, r.stride, 1)
        if r.pad:
            layers.append(nn.ZeroPad2d((1, 0, 2, 1)))  # asymmetric: left, right, top, bottom
            h, w = h + 3, w + 1
        groups = 2 if r.groups else 1
        if r.family == "cnn":
            layers += [nn.Conv2d(width, width, 3, padding=1, groups=groups)]
            layers += [nn.BatchNorm2d(width)] if r.batchnorm else []
            layers += [_act(r, width, gen), *_noop(r)]
        else:
            body = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, groups=groups), *([nn.BatchNorm2d(width)] if r.batchnorm else []),
                _act(r, width, gen), nn.Conv2d(width, width, 3, padding=1))
            layers.append(Residual(body, None, _act(r, width, gen)))
            # a downsampling block: the shortcut is a strided 1x1 conv
            body = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), _act(r, width, gen),
                                 nn.Conv2d(width, width, 3, padding=1))
            layers.append(Residual(body, nn.Conv2d(width, width, 1, stride=2), _act(r, width, gen)))
            h, w = _spatial_out(h, 3, 2, 1), _spatial_out(w, 3, 2, 1)
        if r.pool and min(h, w) >= 2:
            layers.append(nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(width * h * w, r.classes)]
    net = nn.Sequential(*layers)
    _randomize(net, gen)
    return net.eval()


@st.composite
def perturbation_inputs(draw, recipe: Recipe, batch: int = 2):
    """``(images [B, C, H, W], labels [B], eps)`` for a recipe: pixels in [0, 1] with some
    exactly at the ends of the data range (so the clipping layer is active)."""
    seed = draw(st.integers(0, 2**31 - 1))
    eps = draw(st.sampled_from([0.01, 0.05, 0.15, 0.4]))
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, recipe.channels, *recipe.size, generator=gen)
    ends = torch.rand(images.shape, generator=gen)
    images = torch.where(ends < 0.1, 0.0, torch.where(ends > 0.9, 1.0, images))
    labels = torch.randint(0, recipe.classes, (batch,), generator=gen)
    return images, labels, eps


def make_set(pert_id: str, images: Tensor, eps: float, clip: bool) -> AffineSet:
    """The ``AffineSet`` of one configuration of ``PERTURBATIONS``."""
    cls, options = PERTURBATIONS[pert_id]
    return cls(eps, clip=(0.0, 1.0) if clip else None, **options).affine_set(images)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """``logits [B, *S, K]`` -> margins ``logit[label] - logit[i]`` for ``i != label``: ``[B, *S, K-1]``."""
    b, k = logits.shape[0], logits.shape[-1]
    extra = logits.shape[1:-1]
    lab = labels.reshape(b, *([1] * len(extra)), 1).expand(b, *extra, 1)
    full = logits.gather(-1, lab) - logits
    keep = torch.arange(k, device=logits.device).expand(b, k) != labels.unsqueeze(1)  # [B, K]
    keep = keep.reshape(b, *([1] * len(extra)), k).expand(full.shape)
    return full[keep].reshape(b, *extra, k - 1)


def sampled_margins(net: nn.Module, aset: AffineSet, labels: Tensor, num: int, seed: int = 0) -> Tensor:
    """True margins ``[B, num, K-1]`` of ``net(clip(W a + c))`` at ``num`` sampled coefficient
    vectors per sample (random box corners first, then uniform; the nominal one too)."""
    gen = torch.Generator(device=aset.lower.device).manual_seed(seed)
    coeffs = aset.sample(num, gen)
    coeffs[:, -1] = aset.nominal
    images = aset.clipped(aset.images(coeffs))  # [B, num, C, H, W]
    with torch.no_grad():
        logits = net(images.reshape(-1, *aset.image_shape)).reshape(aset.batch_size, num, -1)
    return margins(logits, labels)


def exact_margin_min(module: nn.Module, aset, labels) -> Tensor:
    """Exact minimum over the box of the margins of an *affine* network without clipping:
    ``m(a) = m(lo) + Σ_i g_i (a_i - lo_i)`` with ``g_i (hi_i - lo_i)`` read off the corner
    ``lo + (hi_i - lo_i) e_i``; the minimum adds every negative term. ``[B, K-1]``."""
    lo, hi = aset.lower, aset.upper
    b, k = lo.shape
    steps = torch.diag_embed(hi - lo)  # [B, k, k]
    coeffs = torch.cat([lo.unsqueeze(1), lo.unsqueeze(1) + steps], dim=1)  # [B, k+1, k]
    with torch.no_grad():
        logits = module(aset.images(coeffs).reshape(-1, *aset.image_shape)).reshape(b, k + 1, -1)
    m = margins(logits, labels)  # [B, k+1, K-1]
    return m[:, 0] + (m[:, 1:] - m[:, :1]).clamp(max=0).sum(1)


def check_sound(bounds: dict[str, Tensor], true: Tensor, context: str) -> None:
    """Every bound ``[B, K-1]`` lies below the sampled minimum margin ``true [B, N, K-1]``."""
    true_min = true.amin(1)
    tol = SOUND_TOL * max(1.0, true.abs().max().item())
    for name, lower in bounds.items():
        gap = (lower - true_min).max().item()
        assert gap <= tol, (
            f"UNSOUND {name} ({context}): bound exceeds a sampled margin by {gap:.3e}\n"
            f"bound={lower.tolist()}\nsampled min={true_min.tolist()}")


def check_order(bounds: dict[str, Tensor], context: str) -> None:
    """``ssip >= ibp``, ``rsip-ssip >= rsip-ibp``, ``rsip >= rsip-ibp``, ``rsip-ssip >= ssip``,
    ``rsip-ibp >= ibp``, ``rsip >= ibp`` (lower margin bounds)."""
    pairs = (("ssip", "ibp"), ("rsip-ssip", "rsip-ibp"), ("rsip", "rsip-ibp"), ("rsip-ssip", "ssip"),
             ("rsip-ibp", "ibp"), ("rsip", "ibp"))
    for tight, loose in pairs:
        if tight in bounds and loose in bounds:
            tol = ORDER_TOL * max(1.0, bounds[loose].abs().max().item())
            gap = (bounds[loose] - bounds[tight]).max().item()
            assert gap <= tol, (f"ORDER {tight} < {loose} by {gap:.3e} ({context})\n"
                                f"{tight}={bounds[tight].tolist()}\n{loose}={bounds[loose].tolist()}")
