"""Normalising imported graphs so that every node is something the bound engine knows.

``normalize_graph(gm, example)`` rewrites an onnx2torch ``torch.fx.GraphModule`` in place
(and returns it). The contract with the bound engine - what a NORMALISED graph contains:

* one placeholder (the input batch ``[N, *input_shape]``) and one output (the logits);
* no node computes from shapes only: every subgraph that does not depend on the input's
  *values* (Shape, Gather, Concat, Unsqueeze, ConstantOfShape, OnnxConstant, ... on shapes
  or constants) has been evaluated and replaced by a ``get_attr`` node that reads a module
  buffer. In particular the constant operand of a binary op (the ``Sub``/``Div`` of input
  normalisation, a ``Mul`` scale) is a ``get_attr`` node;
* every Reshape whose target shape was computed from shapes or constants and keeps the
  batch axis is a ``BatchReshape(per_sample_shape)`` module, so the graph runs at any batch
  size (exporters bake the batch size of the export into such shapes: 1, 10, ...);
  ``nn.Flatten`` stays as it is (it is batch-agnostic);
* a trailing Softmax/LogSoftmax (possibly followed by Identity/Dropout/onnx2torch's copy-Identity) is removed; its
  name (``"Softmax"`` or ``"LogSoftmax"``) is in ``gm.meta["head"]`` (``None`` when there
  was none) so that export can put it back;
* every other node is left exactly as onnx2torch made it (``nn.Linear``, ``nn.Conv2d``,
  ``nn.BatchNorm*``, ``nn.ReLU``, ``OnnxBinaryMathOperation``, ``OnnxMatMul`` of two tensors,
  ``OnnxPadStatic``, ``OnnxTranspose``, ``OnnxGlobalAveragePool*``,
  ``OnnxSqueezeStaticAxes``/``OnnxUnsqueezeStaticAxes``, ...) and keeps its name, which is
  the ONNX node's name (so errors can name the ONNX node);
* a ``MatMul`` by a constant 2-D matrix (tf2onnx / MATLAB dense layers), with the ``Add`` of
  a constant bias that follows it if any, is an ``nn.Linear`` named after the MatMul node, so
  every weight of the user's network is a trainable ``nn.Parameter`` (constants stay buffers
  only where they are not weights: normalisation, BatchNorm statistics, folded shapes);
* Casts to the dtype a tensor already has are removed; dead nodes, unused submodules and
  unused buffers are removed.

A shape computation whose value depends on the batch size and that feeds something other
than a batch-preserving Reshape (e.g. an ``Expand`` to ``[N, 1, D]`` in a ViT) is left as
it is: the graph still runs at any batch size, but the engine will report those nodes as
unsupported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

HEAD_KEY = "head"
_HEAD_MODULES = {"Softmax": "Softmax", "LogSoftmax": "LogSoftmax"}
_PASSTHROUGH = (nn.Identity, nn.Dropout)


class BatchReshape(nn.Module):
    """Reshape every sample to ``shape`` (the batch axis is kept, whatever its size).

    Replaces exporter Reshape/Flatten patterns whose target shape was computed from the
    input's shape or hard-codes a batch size, so the graph runs at any batch size.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def normalize_graph(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Normalise ``gm`` in place (see the module docstring) and return it.

    ``example``: a valid input ``[B, *input_shape]`` at a batch size the graph accepts as
    imported (for a model exported at a fixed batch size: that size). When the graph also
    runs at batch ``B + 1``, shape computations whose value changes with the batch size are
    recognised and not folded (unless they only feed a Reshape that becomes a
    ``BatchReshape``); when it does not (a batch size baked into the graph), everything
    shape-only is folded at batch ``B``.
    """
    gm.eval()
    with torch.no_grad():
        first = _record(gm, example)
        try:
            second = _record(gm, torch.cat([example, example[:1]]))
        except Exception:  # fixed batch size baked into the graph: fold at B only
            second = None
    _drop_identity_casts(gm, first)
    const = _value_independent(gm)
    _to_batch_reshapes(gm, const, first, second, example.shape[0])
    _fold_constants(gm, const, first, second)
    _dense_to_linear(gm)
    gm.meta[HEAD_KEY] = _strip_head(gm)
    _cleanup(gm)
    return gm


def _record(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, Any]:
    """Run the graph once and keep every node's value."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.run(x)
    return dict(interpreter.env)


def _is_shape_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for nodes whose output depends on the input's shape only, not its values."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__ == "OnnxShape"
    return node.op == "call_method" and node.target == "size"


def _drop_identity_casts(gm: fx.GraphModule, first: dict[fx.Node, Any]) -> None:
    """Remove Casts whose input already has the target dtype (exporters emit them freely)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)).__name__ != "OnnxCast":
            continue
        source = node.args[0]
        if isinstance(source, fx.Node) and isinstance(first.get(source), torch.Tensor) \
                and first[source].dtype == first[node].dtype:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)


def _value_independent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value does not depend on the input's values (shapes and constants)."""
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_shape_op(gm, node) or all(arg in const for arg in node.all_input_nodes):
            const.add(node)
    return const


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ == "OnnxReshape"


def _batch_kept(value_in: Any, value_out: Any, batch: int) -> bool:
    return (isinstance(value_in, torch.Tensor) and isinstance(value_out, torch.Tensor)
            and value_in.dim() > 0 and value_out.dim() > 0
            and value_in.shape[0] == batch and value_out.shape[0] == batch)


def _to_batch_reshapes(gm, const, first, second, batch: int) -> None:
    """Replace every shape-computed, batch-preserving Reshape by a ``BatchReshape``."""
    for node in list(gm.graph.nodes):
        if not _is_reshape(gm, node) or node in const or len(node.args) < 2 or node.args[1] not in const:
            continue
        data = node.args[0]
        if not _batch_kept(first[data], first[node], batch):
            continue
        per_sample = tuple(first[node].shape[1:])
        if second is not None and not (_batch_kept(second[data], second[node], batch + 1)
                                       and tuple(second[node].shape[1:]) == per_sample):
            continue
        # Same submodule name as the ONNX Reshape node, so errors still name that node.
        gm.add_submodule(node.target, BatchReshape(per_sample))
        node.args = (data,)
        node.kwargs = {}


def _fold_constants(gm, const, first, second) -> None:
    """Replace each shape-only value that a value-dependent node reads by a buffer."""
    for node in list(gm.graph.nodes):
        if node not in const or node.op == "get_attr":
            continue
        if not any(user not in const for user in node.users):
            continue  # interior of a constant subgraph: dies once its frontier is folded
        value = first[node]
        if not isinstance(value, torch.Tensor):
            continue
        if second is not None and not _same(value, second[node]):
            continue  # depends on the batch size: keep the computation
        name = _free_buffer_name(gm, f"folded_{node.name}")
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            folded = gm.graph.get_attr(name)
        node.replace_all_uses_with(folded)
        gm.graph.erase_node(node)


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads; None for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def _module_kind(gm: fx.GraphModule, node: Any) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if type(module).__name__ == "OnnxBinaryMathOperation":
        return {torch.add: "Add"}.get(module.math_op_function, "binary")
    return type(module).__name__


def _dense_to_linear(gm: fx.GraphModule) -> None:
    """``MatMul(x, W)`` (+ ``Add(., b)``) with constant ``W [in, out]`` and ``b [out]`` (or
    ``[1, out]``) -> ``nn.Linear(in, out)`` with ``weight = W.T``: the same function, with the
    weights as parameters."""
    for node in list(gm.graph.nodes):
        if _module_kind(gm, node) != "OnnxMatMul" or len(node.args) != 2:
            continue
        data, weight = node.args
        matrix = _constant(gm, weight)
        if matrix is None or matrix.dim() != 2 or not matrix.is_floating_point() or _constant(gm, data) is not None:
            continue
        fan_in, fan_out = matrix.shape
        bias, add = None, None
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if _module_kind(gm, user) == "Add" and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            vector = _constant(gm, other)
            if vector is not None and vector.dtype == matrix.dtype and vector.numel() == fan_out \
                    and vector.shape in ((fan_out,), (1, fan_out)):
                bias, add = vector.reshape(fan_out), user
        linear = nn.Linear(fan_in, fan_out, bias=bias is not None, dtype=matrix.dtype, device=matrix.device)
        with torch.no_grad():
            linear.weight.copy_(matrix.t())
            if bias is not None:
                linear.bias.copy_(bias)
        gm.add_submodule(node.target, linear)  # same name as the ONNX MatMul node
        node.args = (data,)
        if add is not None:
            add.replace_all_uses_with(node)
            gm.graph.erase_node(add)


def _same(a: Any, b: Any) -> bool:
    return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _free_buffer_name(gm: nn.Module, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _head_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"Softmax"``/``"LogSoftmax"`` when ``node`` is a softmax over the class axis."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    name = type(module).__name__
    if name in _HEAD_MODULES and getattr(module, "dim", None) in (1, -1):
        return _HEAD_MODULES[name]
    if name == "OnnxSoftmaxV1V11" and module.axis in (1, -1):
        return "LogSoftmax" if module.is_log else "Softmax"
    return None


def _strip_head(gm: fx.GraphModule) -> str | None:
    """Remove a trailing Softmax/LogSoftmax (and Identity/Dropout after it); return its kind."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    node = result
    while (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1
           and (isinstance(gm.get_submodule(node.target), _PASSTHROUGH)
                or type(gm.get_submodule(node.target)).__name__ == "OnnxCopyIdentity")):
        node = node.args[0]
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    kind = _head_kind(gm, node)
    if kind is None:
        return None
    output.args = (node.args[0],)
    return kind


def _cleanup(gm: fx.GraphModule) -> None:
    """Drop dead nodes, unused submodules and buffers nobody reads any more."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for qualified, _ in list(gm.named_buffers()):
        owner, _, leaf = qualified.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        # Only constant holders: a layer's own buffers (BatchNorm statistics) are not get_attr.
        if qualified not in used and (module is gm or type(module).__name__ == "InitializersContainer"):
            del module._buffers[leaf]
    gm.graph.lint()
    gm.recompile()
