"""Compiling a network into a bound graph, and the per-pass frame the bound passes walk.

``compile_network(module, rules)`` traces the module (unless it already is a
``torch.fx.GraphModule``), classifies every node as *perturbed* (depends on the input) or
*constant*, picks the op rule of every perturbed node from the rules table and raises one
``RobnetError`` naming the first unsupported op and node before any work starts.

A bound pass works on the *bias-field transform network* (paper §3, §5):

    node 0        the image ``W a + c`` (the transform layer; its input ``a`` is the box),
    clip nodes    ``lo + (hi-lo) - ReLU((hi-lo) - ReLU(x - lo))``: affine and ReLU layers that
                  every method bounds with the same relaxation (only when ``aset.clip``),
    network nodes the perturbed nodes of the imported graph, in topological order.

``BoundNetwork.frame(aset)`` evaluates the constants (so gradients reach parameters behind
``get_attr`` nodes), looks up the per-sample shapes of every node (a one-sample shape pass,
cached per input shape) and hands out the op rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from robnet_svc.bounds.fuse import fuse_activations
from robnet_svc.bounds.ops.base import PERTURBED, ActivationRule, AffineRule, OpCall, OpRule, RelaxedRule
from robnet_svc.bounds.ops import conv as conv_ops
from robnet_svc.bounds.ops.linear import LinearRule
from robnet_svc.bounds.ops.relu import ReluRule
from robnet_svc.bounds.ops.shape import ReshapeRule
from robnet_svc.errors import RobnetError


@dataclass
class PlanNode:
    """One node of the bound graph.

    ``inputs`` index the perturbed parents in the plan; ``call`` is the node's call with
    ``PERTURBED`` markers and, in constant positions, fx nodes (evaluated per pass) or literals.
    """

    name: str
    rule_cls: type[OpRule] | None  # None for the image input
    inputs: list[int] = field(default_factory=list)
    call: OpCall | None = None
    clip_layer: bool = False  # one of the clipping layer's nodes (``_clip_nodes``)


def _scale_shift(x: Tensor, scale: float, shift: float) -> Tensor:
    return x * scale + shift


class _ClipAffine(AffineRule):
    """``y = scale·x + shift`` with python scalars (the affine parts of the clipping layer).
    Scales are ±1, so every part is at most a negation (no full-size multiply by 1)."""

    @property
    def scale(self) -> float:
        return self.call.args[1]

    @property
    def shift(self) -> float:
        return self.call.args[2]

    @property
    def has_bias(self) -> bool:  # noqa: D401 - the shift of the usual [0, 1] clip is 0 in front
        return self.shift != 0

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.call.args[1:]
        return self.linear(x) + shift if shift != 0 else self.linear(x)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        scale = self.call.args[1]
        return x if scale == 1 else -x if scale == -1 else x * scale

    def abs_linear(self, rad: Tensor) -> Tensor:
        scale = abs(self.call.args[1])
        return rad if scale == 1 else rad * scale

    def transpose(self, lam: Tensor) -> tuple[Tensor]:
        return (self.linear(lam),)

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """The output bounds straight from the input bounds (one rounding each), not through
        centre ± radius: at a huge radius that would lose the clip range (issue 13)."""
        scale, shift = self.call.args[1:]
        lo, hi = (self.linear(lower), self.linear(upper)) if scale >= 0 else (self.linear(upper), self.linear(lower))
        return (lo + shift, hi + shift) if shift != 0 else (lo, hi)


def _clip_nodes(clip: tuple[float, float] | None) -> list[PlanNode]:
    """The clipping layer ``-(ReLU(-ReLU(x - lo) + (hi-lo)) - (hi-lo)) + lo`` as plan nodes
    1..5 (paper §5 for ``[0, 1]``), or nothing when ``clip`` is None."""
    if clip is None:
        return []
    lo, hi = float(clip[0]), float(clip[1])
    span = hi - lo

    def affine(name: str, scale: float, shift: float, parent: int) -> PlanNode:
        call = OpCall(name, "call_function", _scale_shift, None, (PERTURBED, scale, shift), {})
        return PlanNode(name, _ClipAffine, [parent], call, clip_layer=True)

    def relu(name: str, parent: int) -> PlanNode:
        call = OpCall(name, "call_function", torch.relu, None, (PERTURBED,), {})
        return PlanNode(name, ReluRule, [parent], call, clip_layer=True)

    return [
        affine("clip_shift", 1.0, -lo, 0),
        relu("clip_relu_low", 1),
        affine("clip_flip", -1.0, span, 2),
        relu("clip_relu_high", 3),
        affine("clip_out", -1.0, hi, 4),
    ]


class _LeafTracer(fx.Tracer):
    """Keeps every module that has a rule as one node (e.g. ``BatchReshape``)."""

    def __init__(self, rules: dict):
        super().__init__()
        self.rules = rules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in self.rules or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, rules: dict) -> fx.GraphModule:
    if isinstance(module, fx.GraphModule):
        return module
    if type(module) in rules:  # a bare layer: trace it as a one-node graph
        module = nn.Sequential(module)
    try:
        graph = _LeafTracer(rules).trace(module)
    except Exception as exc:
        raise RobnetError(f"cannot trace {type(module).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
                          "export it to ONNX or make its forward traceable") from exc
    return fx.GraphModule(module, graph)


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"method .{node.target}()"
    return getattr(node.target, "__name__", repr(node.target))


def _rule_key(gm: fx.GraphModule, node: fx.Node) -> Any:
    """Rules are keyed by module type, function, or ``torch.Tensor.<method>`` for methods."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target, node.target)
    return node.target


def _template(gm: fx.GraphModule, node: fx.Node, perturbed: set,
              nested: bool = False) -> tuple[OpCall | None, list[fx.Node], str | None]:
    """The node's call with PERTURBED markers, its perturbed parents in marker order, or a
    reason why its arguments are unsupported. ``nested``: markers may sit inside list/tuple
    arguments (``torch.cat([x, y], 1)``)."""
    parents: list[fx.Node] = []
    problems: list[str] = []

    def mark(a, depth: int):
        if isinstance(a, fx.Node) and a in perturbed:
            if depth and not nested:
                problems.append("a perturbed tensor inside a list/tuple argument")
            parents.append(a)
            return PERTURBED
        if isinstance(a, (list, tuple)):
            marked = [mark(v, depth + 1) for v in a]
            return tuple(marked) if isinstance(a, tuple) else marked
        if isinstance(a, (dict, slice)) and nested_perturbed(a):
            problems.append("a perturbed tensor inside a dict or slice argument")
        return a

    def nested_perturbed(a) -> bool:
        found = []
        fx.node.map_arg(a, lambda n: found.append(n in perturbed))
        return any(found)

    args = [mark(a, 0) for a in node.args]
    if any(nested_perturbed(v) for v in node.kwargs.values()):
        problems.append("a perturbed tensor passed as a keyword argument")
    if problems:
        return None, parents, problems[0]
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    target = module if module is not None else node.target
    return OpCall(node.name, node.op, target, module, tuple(args), dict(node.kwargs)), parents, None


def _analyse(gm: fx.GraphModule, rules: dict) -> tuple[list[PlanNode], list[fx.Node], list[tuple[str, str]]]:
    """Network plan nodes (parents as fx nodes for now), constant nodes, unsupported list."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unsupported: list[tuple[str, str]] = []
    if len(placeholders) != 1:
        return [], [], [("<graph>", f"{len(placeholders)} inputs (expected exactly one image input)")]
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    out_arg = output.args[0]
    if isinstance(out_arg, (tuple, list)):
        if len(out_arg) != 1:
            return [], [], [("<graph>", f"{len(out_arg)} outputs (expected one logits tensor)")]
        out_arg = out_arg[0]
    # Only ancestors of the output matter.
    needed, stack = set(), [out_arg]
    while stack:
        n = stack.pop()
        if isinstance(n, fx.Node) and n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    perturbed = {placeholders[0]}
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr") and any(p in perturbed for p in n.all_input_nodes):
            perturbed.add(n)
    if out_arg not in perturbed:
        unsupported.append(("<graph>", "the output does not depend on the input"))
    plan: list[PlanNode] = []
    constants: list[fx.Node] = []
    tuple_ops: dict[fx.Node, tuple[type[OpRule], OpCall, list[fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n not in needed or n.op == "placeholder":
            continue
        if n not in perturbed:
            constants.append(n)
            continue
        if n.target is operator.getitem and n.args[0] in tuple_ops and isinstance(n.args[1], int):
            # one output of a tuple-valued op (Split, chunk): bound as that op plus the selection
            rule_cls, call, parents = tuple_ops[n.args[0]]
            call = dataclasses.replace(call, name=n.name, item=n.args[1])
            plan.append(PlanNode(n.name, rule_cls, parents, call))
            continue
        rule_cls = rules.get(_rule_key(gm, n))
        if rule_cls is None:
            unsupported.append((n.name, _describe(gm, n)))
            continue
        call, parents, reason = _template(gm, n, perturbed, rule_cls.nested_inputs)
        if reason is None:
            rule_cls = rule_cls.resolve(call)
            reason = rule_cls.check(call)
        if reason is not None:
            unsupported.append((n.name, f"{_describe(gm, n)} ({reason})"))
            continue
        if getattr(rule_cls, "tuple_output", False):
            users = list(n.users)
            if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
                unsupported.append((n.name, f"{_describe(gm, n)} (its outputs are used other than by indexing)"))
                continue
            tuple_ops[n] = (rule_cls, call, parents)
            continue
        plan.append(PlanNode(n.name, rule_cls, parents, call))
    return plan, constants, unsupported


def find_unsupported(gm: nn.Module, rules: dict | None = None) -> list[tuple[str, str]]:
    """``[(node_name, op_description)]`` of every node the engine cannot bound (empty: all fine)."""
    rules = registry_rules() if rules is None else rules
    return _analyse(fuse_activations(_trace(gm, rules), rules), rules)[2]


def registry_rules() -> dict:
    """The op-rule table of every loaded plugin, the built-ins included (``load_registry().rules()``):
    what compiling without an explicit table uses, so that no plugin's rules are left out."""
    from robnet_svc.plugins import load_registry

    return load_registry().rules()


class BoundNetwork(nn.Module):
    """A network compiled for bounding. ``net(x)`` is the plain forward of the wrapped module
    (same parameters); the bound methods walk ``net.frame(aset)``."""

    def __init__(self, module: nn.Module, gm: fx.GraphModule, plan: list[PlanNode],
                 constants: list[fx.Node], rules: dict):
        super().__init__()
        self.module = module
        self.rules = rules  # the table it was compiled with (a float64 copy recompiles with it)
        self._gm = [gm]  # not a submodule: it shares module's parameters already
        self._plan = plan
        self._constants = constants
        self._shapes: dict[tuple, list[tuple[int, ...]]] = {}
        self._num_classes: int | None = None

    @property
    def gm(self) -> fx.GraphModule:
        return self._gm[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    @property
    def num_classes(self) -> int:
        """K, the number of logits (known after the first bound pass or ``infer_shapes``)."""
        if self._num_classes is None:
            last = self._plan[-1].call.module if self._plan else None
            if isinstance(last, nn.Linear):
                self._num_classes = last.out_features
            else:
                raise RobnetError("number of classes unknown: call net.infer_shapes(input_shape) first")
        return self._num_classes

    def infer_shapes(self, input_shape: tuple[int, ...], clip=None) -> list[tuple[int, ...]]:
        """Per-sample shapes of every plan node for per-sample input ``input_shape``."""
        key = (tuple(input_shape), clip is not None)
        if key not in self._shapes:
            plan = self.plan(clip)
            # the dtype of the weights (buffers too: a model of constants has no parameters)
            tensors = (t for t in (*self.module.parameters(), *self.module.buffers()) if t.is_floating_point())
            param = next(tensors, None)
            x = torch.zeros((1, *input_shape), dtype=param.dtype if param is not None else None,
                            device=param.device if param is not None else None)
            env = self._constant_env()
            values = [x]
            shapes = [tuple(input_shape)]
            # eval mode: a one-sample BatchNorm forward must neither fail nor update running stats
            modes = {m: m.training for m in self.module.modules()}
            self.module.eval()
            try:
                self._shape_pass(plan, env, values, shapes)
            finally:
                for m, mode in modes.items():
                    m.training = mode
            self._shapes[key] = shapes
            self._num_classes = math.prod(shapes[-1])
        return self._shapes[key]

    @staticmethod
    def _shape_pass(plan, env, values, shapes) -> None:
        with torch.no_grad():
            for node in plan[1:]:
                call = _bind(node.call, env)
                out = call.run(*(values[i] for i in node.inputs))
                if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != 1:
                    raise RobnetError(f"node {node.name!r} does not keep the batch axis "
                                      f"(output {getattr(out, 'shape', type(out).__name__)}); cannot bound it")
                values.append(out)
                shapes.append(tuple(out.shape[1:]))

    def plan(self, clip) -> list[PlanNode]:
        """Image node, clip nodes (when ``clip``), network nodes with parents as plan indices."""
        front = [PlanNode("image", None)] + _clip_nodes(clip)
        index = {self.gm_input_name(): len(front) - 1}
        nodes = list(front)
        for p in self._plan:
            parents = [index[a.name] for a in p.inputs]
            index[p.name] = len(nodes)
            nodes.append(PlanNode(p.name, p.rule_cls, parents, p.call))
        return nodes

    def gm_input_name(self) -> str:
        return next(n.name for n in self.gm.graph.nodes if n.op == "placeholder")

    def _constant_env(self) -> dict[str, Any]:
        """Evaluate the constant nodes (every pass: parameters behind get_attr keep gradients)."""
        env: dict[str, Any] = {}
        gm = self.gm
        for n in self._constants:
            args = fx.node.map_arg(n.args, lambda a: env[a.name])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
            if n.op == "get_attr":
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n.name] = obj
            elif n.op == "call_module":
                env[n.name] = gm.get_submodule(n.target)(*args, **kwargs)
            elif n.op == "call_function":
                env[n.name] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n.name] = getattr(args[0], n.target)(*args[1:], **kwargs)
        return env

    def frame(self, aset) -> "Frame":
        """Everything one bound pass needs for this perturbation set."""
        shapes = self.infer_shapes(tuple(aset.image_shape), aset.clip)
        return Frame(self.plan(aset.clip), shapes, self._constant_env())


def _bind(call: OpCall, env: dict[str, Any], in_shapes=None, out_shape=None) -> OpCall:
    def value(a):
        return fx.node.map_arg(a, lambda n: env[n.name]) if a is not PERTURBED else a

    return OpCall(call.name, call.kind, call.target, call.module, tuple(value(a) for a in call.args),
                  {k: value(v) for k, v in call.kwargs.items()}, in_shapes or [], out_shape, call.item)


class Frame:
    """The bound graph of one pass: plan nodes, per-sample shapes, rules with constants bound."""

    def __init__(self, nodes: list[PlanNode], shapes: list[tuple[int, ...]], env: dict[str, Any]):
        self.nodes, self.shapes, self._env = nodes, shapes, env
        #: the convolutions' layout threshold for this frame's passes (None: ``CHANNELS_LAST_MIN``)
        self.channels_last_min: int | None = None
        self._rules: dict[int, OpRule] = {}
        self._bias: dict[int, Tensor] = {}

    def rule(self, i: int) -> OpRule:
        if i not in self._rules:
            node = self.nodes[i]
            call = _bind(node.call, self._env, [self.shapes[j] for j in node.inputs], self.shapes[i])
            self._rules[i] = node.rule_cls(call)
        return self._rules[i]

    def bias(self, i: int, like: Tensor) -> Tensor | None:
        """``f(0)`` of affine node i (``[1, *shape]``), None when the op has no constant part."""
        rule = self.rule(i)
        if not rule.has_bias:
            return None
        if i not in self._bias:
            self._bias[i] = rule.bias(like)
        return self._bias[i]

    def is_activation(self, i: int) -> bool:
        return i > 0 and isinstance(self.rule(i), ActivationRule)

    def is_relaxed(self, i: int) -> bool:
        """A non-elementwise or multi-input non-linear node (``RelaxedRule``: MaxPool, products)."""
        return i > 0 and isinstance(self.rule(i), RelaxedRule)

    def is_nonlinear(self, i: int) -> bool:
        return i > 0 and isinstance(self.rule(i), (ActivationRule, RelaxedRule))

    @property
    def prefers_channels_last(self) -> bool:
        """Whether most of the rules that vote on the layout (2-D convolutions, ``ConvRule.layout_vote``:
        True when the convolution reads at least ``channels_last_min`` channels) ask for it."""
        threshold = conv_ops.CHANNELS_LAST_MIN if self.channels_last_min is None else self.channels_last_min
        votes = [rule.layout_vote(threshold) for rule in (self.rule(i) for i in range(1, len(self.nodes)))
                 if hasattr(rule, "layout_vote")]
        votes = [v for v in votes if v is not None]
        return 2 * sum(votes) > len(votes)

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @functools.cached_property
    def clip_end(self) -> int:
        """The clipping layer's last node (nodes ``1..clip_end``), 0 when the pass has none."""
        end = 0
        while end + 1 < len(self.nodes) and self.nodes[end + 1].clip_layer:
            end += 1
        return end

    @functools.cached_property
    def consumers(self) -> dict[int, list[int]]:
        """Node -> the nodes reading it."""
        consumers: dict[int, list[int]] = {}
        for j, node in enumerate(self.nodes):
            for p in node.inputs:
                consumers.setdefault(p, []).append(j)
        return consumers

    def dense_after_flatten(self, i: int) -> int | None:
        """The ``nn.Linear`` node that alone reads node ``i`` when ``i`` flattens a multi-axis
        tensor (``[C, H, W] -> [C·H·W]``), else None: the SSIP pass may then skip the flatten's
        rows and apply the dense layer to its input in the input's memory order
        (``propagate._FlattenedDense``)."""
        readers = self.consumers.get(i, [])
        if i == 0 or len(readers) != 1 or not isinstance(self.rule(i), ReshapeRule):
            return None
        j = readers[0]
        shape_in = self.shapes[self.nodes[i].inputs[0]]
        if (len(shape_in) < 2 or self.shapes[i] != (math.prod(shape_in),) or self.nodes[j].inputs != [i]
                or not isinstance(self.rule(j), LinearRule)):
            return None
        return j

    def affine_path_to_output(self, i: int) -> bool:
        """Whether node ``i``'s value reaches the output through affine nodes alone (so a tail
        back-substitution, ``propagate.back_substitute`` with a frontier, goes past it)."""
        consumers = self.consumers
        todo, seen = [i], set()
        while todo:
            j = todo.pop()
            if j == self.output:
                return True
            for c in consumers.get(j, []):
                if c not in seen and not self.is_nonlinear(c):
                    seen.add(c)
                    todo.append(c)
        return False


def compile_network(module: nn.Module, rules: dict | None = None) -> BoundNetwork:
    """Compile ``module`` for bounding with the rules table ``rules`` (target -> OpRule class;
    None: the registry's, ``registry_rules()``). Raises RobnetError naming the first unsupported op and node."""
    if isinstance(module, BoundNetwork):
        return module
    rules = registry_rules() if rules is None else rules
    gm = fuse_activations(_trace(module, rules), rules)  # x*sigmoid(x) -> SiLU, ... (bounds/fuse.py)
    plan, constants, unsupported = _analyse(gm, rules)
    if unsupported:
        name, what = unsupported[0]
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        raise RobnetError(
            f"cannot bound node {name!r}: unsupported operation {what}{more}; supported operations are "
            "listed by `robnet-svc plugins` (op_rules), new ones can be added with the robnet_register_op_rules hook"
        )
    return BoundNetwork(module, gm, plan, constants, rules)
