"""Fusing activations that exporters write as subgraphs back into one activation node.

ONNX has no SiLU (and no GELU before opset 20; no HardSwish before opset 14), so exporters
write them as products of the input with a function of the same input:

* SiLU       ``Mul(x, Sigmoid(x))``                                  -> ``nn.SiLU``
* HardSwish  ``Mul(x, HardSigmoid(x))`` (any α > 0, β)              -> ``HardSwish(α, β)``
* GELU       ``Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)``            -> ``nn.GELU``
  (the PyTorch legacy exporter's form; operand orders and ``Mul(x, 1/√2)`` are accepted)

A product of two perturbed tensors has no affine rule, but these products are one
elementwise function of one tensor, and the activation rules bound that function directly
(much tighter than a bilinear relaxation of the product). ``fuse_activations`` rewrites the
bound graph only (a copy sharing the module's parameters): the module's own forward is left
as imported. A pattern is fused only when every intermediate value has no other user.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from robnet_svc.bounds.ops.arithmetic import op_name
from robnet_svc.bounds.ops.base import OpCall

_TOL = 1e-6  # relative, for the constants of the GELU pattern (exporters write float32)


class HardSwish(nn.Module):
    """``x · clamp(αx + β, 0, 1)``: the fusion of ``x * HardSigmoid(α, β)(x)``."""

    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.clamp(x * self.alpha + self.beta, 0, 1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def fuse_activations(gm: fx.GraphModule, rules: dict) -> fx.GraphModule:
    """``gm`` itself when nothing matches, else a fused copy (same parameters)."""
    if not _matches(gm, rules):
        return gm
    fused = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for out, x, module, dead in _matches(fused, rules):
        name = _free_name(fused, f"{out.name}_fused")
        fused.add_submodule(name, module)
        with fused.graph.inserting_before(out):
            node = fused.graph.call_module(name, (x,))
        out.replace_all_uses_with(node)
        for d in dead:  # users before producers
            fused.graph.erase_node(d)
    fused.graph.lint()
    fused.recompile()
    return fused


def _matches(gm: fx.GraphModule, rules: dict) -> list[tuple[fx.Node, fx.Node, nn.Module, list[fx.Node]]]:
    found, taken = [], set()
    for node in gm.graph.nodes:
        for match in (_silu_or_hardswish(gm, node), _gelu(gm, node)):
            if match is not None and type(match[2]) in rules and not taken.intersection(match[3]):
                found.append(match)
                taken.update(match[3])
    return found


# ------------------------------------------------------------------------- node predicates


def _module(gm: fx.GraphModule, node) -> nn.Module | None:
    return gm.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def _binary(gm: fx.GraphModule, node) -> str | None:
    """"add" | "sub" | "mul" | "div" for a two-argument arithmetic node, else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function", "call_method") \
            or len(node.args) != 2 or node.kwargs:
        return None
    module = _module(gm, node)
    target = module if module is not None else node.target
    return op_name(OpCall(node.name, node.op, target, module, tuple(node.args), {}))


def _is_call(gm: fx.GraphModule, node, functions: tuple, methods: tuple, modules: tuple) -> bool:
    if not isinstance(node, fx.Node) or len(node.args) != 1 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    module = _module(gm, node)
    return module is not None and type(module).__name__ in modules


def _constant(gm: fx.GraphModule, value) -> float | None:
    """The scalar value of a literal or a ``get_attr`` node holding one value, else None."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj = gm
        for part in value.target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, Tensor) and obj.numel() == 1:
            return float(obj.reshape(()).item())
    return None


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= _TOL * abs(target)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _split(args, pred):
    """``(match, other)`` of a commutative two-argument call where ``pred(match)``, else None."""
    a, b = args
    if pred(a):
        return a, b
    if pred(b):
        return b, a
    return None


# ---------------------------------------------------------------------------- patterns


def _hardsigmoid_params(gm: fx.GraphModule, node) -> tuple[float, float] | None:
    if not _is_call(gm, node, (F.hardsigmoid,), ("hardsigmoid",), ("OnnxHardSigmoid", "Hardsigmoid")):
        return None
    module = _module(gm, node)
    return float(getattr(module, "alpha", 1 / 6)), float(getattr(module, "beta", 0.5))


def _silu_or_hardswish(gm: fx.GraphModule, node: fx.Node):
    if _binary(gm, node) != "mul":
        return None
    for inner, x in ((node.args[1], node.args[0]), (node.args[0], node.args[1])):
        if not isinstance(inner, fx.Node) or not inner.args or inner.args[0] is not x or not _only_user(inner, node):
            continue
        if _is_call(gm, inner, (torch.sigmoid, F.sigmoid), ("sigmoid",), ("Sigmoid",)):
            return node, x, nn.SiLU(), [node, inner]
        params = _hardsigmoid_params(gm, inner)
        if params is not None and params[0] > 0:
            return node, x, HardSwish(*params), [node, inner]
    return None


def _gelu(gm: fx.GraphModule, out: fx.Node):
    """``out = (x · (1 + erf(x/√2))) · 0.5`` in the legacy exporter's association."""
    if _binary(gm, out) != "mul":
        return None
    split = _split(out.args, lambda a: _close(_constant(gm, a), 0.5))
    if split is None or not isinstance(split[1], fx.Node) or _binary(gm, split[1]) != "mul":
        return None
    prod = split[1]
    for add, x in ((prod.args[1], prod.args[0]), (prod.args[0], prod.args[1])):
        if _binary(gm, add) != "add" or not isinstance(x, fx.Node):
            continue
        inner = _split(add.args, lambda a: _close(_constant(gm, a), 1.0))
        if inner is None:
            continue
        erf = inner[1]
        if not _is_call(gm, erf, (torch.erf, torch.special.erf), ("erf",), ("OnnxErf",)):
            continue
        scaled = erf.args[0]
        kind = _binary(gm, scaled)
        if kind not in ("div", "mul") or scaled.args[0] is not x:
            continue
        c = _constant(gm, scaled.args[1])
        if not (_close(c, math.sqrt(2)) if kind == "div" else _close(c, 1 / math.sqrt(2))):
            continue
        chain = [out, prod, add, erf, scaled]
        if all(_only_user(n, user) for n, user in zip(chain[1:], chain[:-1])):
            return out, x, nn.GELU(), chain
    return None


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name

