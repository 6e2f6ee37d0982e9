"""Per-op rules against dense Jacobians; compile-time errors; corpus models compile."""

from __future__ import annotations

import gzip
import operator

import pytest
import torch
from torch import nn

from robnet_svc.bounds import compile_network
from robnet_svc.bounds.graph import find_unsupported
from robnet_svc.bounds.ops.relu import relu_relaxation
from robnet_svc.errors import RobnetError
from robnet_svc.perturbations.base import DenseAffineSet



@pytest.fixture
def float64():
    """Exact comparisons (1e-10) need double precision; restored after the test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Const(nn.Module):
    """``op(x, c)`` with ``c`` a buffer (traced as a get_attr node, like onnx2torch constants)."""

    def __init__(self, op, c, x_first=True):
        super().__init__()
        self.op, self.x_first = op, x_first
        self.register_buffer("c", c)

    def forward(self, x):
        return self.op(x, self.c) if self.x_first else self.op(self.c, x)


class Residual(nn.Module):
    def __init__(self, sub: bool = False):
        super().__init__()
        self.conv, self.sub = nn.Conv2d(2, 2, 3, padding=1), sub

    def forward(self, x):
        return self.conv(x) - x if self.sub else self.conv(x) + x


def _onnx2torch_cases():
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
    from onnx2torch.node_converters.global_average_pool import OnnxGlobalAveragePoolWithKnownInputShape
    from onnx2torch.node_converters.matmul import OnnxMatMul
    from onnx2torch.node_converters.pad import OnnxPadStatic
    from onnx2torch.node_converters.squeeze import OnnxSqueezeStaticAxes
    from onnx2torch.node_converters.transpose import OnnxTranspose
    from onnx2torch.node_converters.unsqueeze import OnnxUnsqueezeStaticAxes

    return [
        ("onnx_div", Const(OnnxBinaryMathOperation("Div"), torch.rand(2, 1, 1) + 0.5), (2, 5, 5)),
        ("onnx_sub_const_first", Const(OnnxBinaryMathOperation("Sub"), torch.randn(2, 5, 5), False), (2, 5, 5)),
        ("onnx_matmul", Const(OnnxMatMul(), torch.randn(6, 4)), (3, 6)),
        ("onnx_gap", OnnxGlobalAveragePoolWithKnownInputShape([1, 3, 4, 4]), (3, 4, 4)),
        ("onnx_pad", OnnxPadStatic(pads=[1, 2, 0, 1], constant_value=0.5), (2, 4, 4)),
        ("onnx_transpose", OnnxTranspose([0, 2, 3, 1]), (2, 3, 4)),
        ("onnx_squeeze", OnnxSqueezeStaticAxes([2]), (3, 1, 4)),
        ("onnx_unsqueeze", OnnxUnsqueezeStaticAxes([1]), (3, 4)),
    ]


class Call(nn.Module):
    """``fn(x)`` as a one-node graph (indexing, cat, split item, reductions, resizes)."""

    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for k, v in buffers.items():
            self.register_buffer(k, v)

    def forward(self, x):
        return self.fn(self, x)


def _structural_cases():
    """Issue 12's affine structural ops (each one plan node)."""
    import torch.nn.functional as F
    from onnx2torch.node_converters.concat import OnnxConcat
    from onnx2torch.node_converters.gather import OnnxGather
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes, OnnxReduceSumStaticAxes
    from onnx2torch.node_converters.resize import OnnxResize
    from onnx2torch.node_converters.slice import OnnxSlice

    class TwoInputs(nn.Module):  # OnnxConcat of x and a scaled copy is two plan nodes; x with itself is one
        def __init__(self):
            super().__init__()
            self.cat = OnnxConcat(axis=1)

        def forward(self, x):
            return self.cat(x, x)

    class OnnxCall(nn.Module):
        def __init__(self, module, *consts):
            super().__init__()
            self.m = module
            for i, c in enumerate(consts):
                self.register_buffer(f"c{i}", c)
            self.n = len(consts)

        def forward(self, x):
            return self.m(x, *(getattr(self, f"c{i}") for i in range(self.n)))

    return [
        ("cat_channels_self", Call(lambda m, x: torch.cat([x, x], 1)), (2, 3, 3)),
        ("cat_features_neg_axis", Call(lambda m, x: torch.cat((x, x), -1)), (2, 3)),
        ("getitem_slice", Call(lambda m, x: x[:, 1:, ::2]), (3, 4, 5)),
        ("getitem_index_tensor", Call(lambda m, x: x[:, m.idx], idx=torch.tensor([2, 0, 0, 1])), (3, 4)),
        ("narrow", Call(lambda m, x: torch.narrow(x, 2, 1, 2)), (2, 3, 4)),
        ("index_select", Call(lambda m, x: torch.index_select(x, 1, m.idx), idx=torch.tensor([1, 1, 0])), (2, 3)),
        ("chunk_item", Call(lambda m, x: torch.chunk(x, 2, 1)[1]), (4, 2, 2)),
        ("split_item", Call(lambda m, x: torch.split(x, [1, 3], dim=3)[1]), (2, 2, 4)),
        ("transpose", Call(lambda m, x: torch.transpose(x, 1, 3)), (2, 3, 4)),
        ("shuffle", Call(lambda m, x: x.reshape(-1, 2, 2, 3, 3).transpose(1, 2).reshape(-1, 4, 3, 3)), (4, 3, 3)),
        ("mean_spatial", Call(lambda m, x: torch.mean(x, dim=(2, 3), keepdim=True)), (3, 4, 5)),
        ("sum_channels", Call(lambda m, x: x.sum(1)), (3, 4, 5)),
        ("interp_nearest", Call(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")), (2, 3, 3)),
        ("interp_bilinear", Call(lambda m, x: F.interpolate(x, size=(5, 7), mode="bilinear")), (2, 3, 4)),
        ("interp_bilinear_ac", Call(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                align_corners=True)), (2, 3, 3)),
        ("upsample", nn.Upsample(scale_factor=2), (2, 3, 3)),
        ("onnx_concat", TwoInputs(), (2, 3)),
        ("onnx_slice", OnnxCall(OnnxSlice(), torch.tensor([1, 0]), torch.tensor([3, 9]), torch.tensor([2, 3]),
                                torch.tensor([1, 2])), (2, 4, 5)),
        ("onnx_gather", OnnxCall(OnnxGather(axis=2), torch.tensor([2, 0, 2])), (2, 3, 4)),
        ("onnx_reduce_mean", OnnxReduceStaticAxes("ReduceMean", [2, 3], 1), (3, 4, 5)),
        ("onnx_reduce_sum", OnnxReduceSumStaticAxes([1], 0), (3, 4)),
        ("onnx_resize_linear", OnnxCall(OnnxResize(mode="linear"), torch.tensor([]),
                                        torch.tensor([1.0, 1.0, 2.0, 2.0])), (2, 3, 3)),
        ("onnx_resize_nearest", OnnxCall(OnnxResize(mode="nearest"), torch.tensor([]),
                                         torch.tensor([1.0, 1.0, 2.0, 3.0])), (2, 2, 3)),
    ]


def _cases():
    torch.manual_seed(0)
    bn2 = nn.BatchNorm2d(3)
    bn2.running_mean.uniform_(-1, 1), bn2.running_var.uniform_(0.3, 2), bn2.weight.data.uniform_(-2, 2)
    bn1 = nn.BatchNorm1d(4)
    bn1.running_mean.uniform_(-1, 1), bn1.running_var.uniform_(0.3, 2), bn1.weight.data.uniform_(-2, 2)
    bn2.train(), bn1.train()  # the rules must use running statistics whatever the mode
    return [
        ("linear", nn.Linear(6, 4), (6,)),
        ("conv_s2_p1", nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 7)),
        ("conv_groups_dilation", nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False), (4, 6, 5)),
        ("conv_asym_stride", nn.Conv2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0)), (2, 8, 9)),
        ("conv_reflect", nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5)),
        ("conv1d", nn.Conv1d(2, 3, 3, stride=2), (2, 9)),
        ("batchnorm2d", bn2, (3, 4, 4)),
        ("batchnorm1d", bn1, (4,)),
        ("avgpool", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 6, 6)),
        ("adaptive_avgpool", nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7)),
        ("zeropad", nn.ZeroPad2d((1, 0, 2, 1)), (2, 3, 3)),
        ("reflectpad", nn.ReflectionPad2d(1), (2, 3, 3)),
        ("flatten", nn.Flatten(), (2, 3, 3)),
        ("dropout", nn.Dropout(0.5).eval(), (5,)),
        ("add_scalar", Const(operator.add, torch.randn(3, 1, 1)), (3, 2, 2)),
        ("rsub", Const(operator.sub, torch.randn(3, 2, 2), False), (3, 2, 2)),
        ("mul", Const(operator.mul, torch.randn(3, 1, 1)), (3, 2, 2)),
        ("truediv", Const(torch.div, torch.rand(1, 2, 2) + 0.5), (3, 2, 2)),
        ("matmul_left", Const(operator.matmul, torch.randn(3, 5), False), (5, 2)),
        ("residual_add", Residual(), (2, 4, 4)),
        ("residual_sub", Residual(sub=True), (2, 4, 4)),
    ] + _onnx2torch_cases() + _structural_cases()


def _frame_for(module: nn.Module, in_shape):
    net = compile_network(module)
    aset = DenseAffineSet(torch.zeros(1, 1, *in_shape), torch.zeros(1, *in_shape), torch.zeros(1, 1),
                          torch.zeros(1, 1), torch.zeros(1, 1), clip=None)
    return net.frame(aset)


def _eval_reference(module):
    """The affine map the rules must implement (BatchNorm: eval mode)."""
    was = module.training
    module.eval()
    return module, was


@pytest.mark.parametrize("name,module,in_shape", _cases(), ids=[c[0] for c in _cases()])
def test_affine_rule_matches_dense_jacobian(name, module, in_shape, float64):
    module = module.double()
    frame = _frame_for(module, in_shape)
    ops = [i for i in range(1, len(frame.nodes))]
    # every case is one op, except the residuals (conv, then the two-input add/sub)
    x = torch.randn(3, *in_shape)
    ref, was_training = _eval_reference(module)
    try:
        expected = ref(x)
        n = x[0].numel()
        offset = ref(torch.zeros(1, *in_shape)).reshape(-1)
        # columns of the Jacobian: the affine map applied to the unit vectors, minus f(0)
        jac = (ref(torch.eye(n).reshape(n, *in_shape)).reshape(n, -1) - offset).t()
    finally:
        module.train(was_training)
    values = {0: x}
    for i in ops:
        rule = frame.rule(i)
        values[i] = rule.forward(*(values[j] for j in frame.nodes[i].inputs))
    torch.testing.assert_close(values[ops[-1]], expected, rtol=1e-10, atol=1e-10)
    if len(ops) != 1:
        return  # the residual's pieces are checked by the single-op cases and below
    rule = frame.rule(ops[0])
    n_in = len(frame.nodes[ops[0]].inputs)  # > 1 when an op takes the input twice (torch.cat([x, x]))
    rad = torch.rand(3, *in_shape)
    exact = rad.reshape(3, -1) @ jac.abs().t()
    if name == "conv_reflect":
        # a reflected pixel meets the kernel twice: conv with |W| over-approximates |J| (sound)
        assert (rule.abs_linear(rad).reshape(3, -1) >= exact - 1e-10).all()
    else:
        torch.testing.assert_close(rule.abs_linear(*[rad] * n_in).reshape(3, -1), exact, rtol=1e-10, atol=1e-10)
    lam = torch.randn(3, *frame.shapes[ops[0]])
    back = sum(rule.transpose(lam))
    torch.testing.assert_close(back.reshape(3, -1), lam.reshape(3, -1) @ jac, rtol=1e-10, atol=1e-10)
    bias = frame.bias(ops[0], lam)
    if bias is not None:
        torch.testing.assert_close(bias.reshape(-1), offset, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sub", [False, True])
def test_two_input_rule_transposes_to_both_parents(sub, float64):
    frame = _frame_for(Residual(sub), (2, 4, 4))
    i = len(frame.nodes) - 1
    rule = frame.rule(i)
    lam = torch.randn(5, 2, 4, 4)
    a, b = rule.transpose(lam)
    torch.testing.assert_close(a, lam)
    torch.testing.assert_close(b, -lam if sub else lam)
    ra, rb = torch.rand(5, 2, 4, 4), torch.rand(5, 2, 4, 4)
    torch.testing.assert_close(rule.abs_linear(ra, rb), ra + rb)


def test_relu_relaxation_is_sound_and_uses_the_adaptive_lower_slope(float64):
    lower = torch.tensor([-2.0, -1.0, 0.5, -3.0, -1.0])
    upper = torch.tensor([1.0, 3.0, 2.0, -0.5, 1.0])
    r = relu_relaxation(lower, upper)
    torch.testing.assert_close(r.lower_slope, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))  # u >= -l -> alpha = 1
    xs = lower[:, None] + (upper - lower)[:, None] * torch.linspace(0, 1, 101)[None]
    y = xs.clamp(min=0)
    assert (r.lower_slope[:, None] * xs + r.lower_bias[:, None] <= y + 1e-12).all()
    assert (r.upper_slope[:, None] * xs + r.upper_bias[:, None] >= y - 1e-12).all()
    # chord through (l, 0) and (u, u)
    torch.testing.assert_close(r.upper_slope[0] * -2.0 + r.upper_bias[0], torch.tensor(0.0))
    torch.testing.assert_close(r.upper_slope[0] * 1.0 + r.upper_bias[0], torch.tensor(1.0))


def test_unsupported_op_named_with_its_node_at_compile_time():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.LocalResponseNorm(2), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(RobnetError) as info:
        compile_network(model)
    message = str(info.value)
    assert "LocalResponseNorm" in message and "'_2'" in message and "\n" not in message  # fx: module '2' -> '_2'
    assert find_unsupported(model) == [("_2", "LocalResponseNorm")]


def test_product_of_two_perturbed_tensors_is_relaxed_and_division_refused():
    from robnet_svc.bounds.ops.product import ProductRule

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    class Ratio(nn.Module):
        def forward(self, x):
            return x / (x + 2)

    net = compile_network(Square())
    assert [p.rule_cls for p in net._plan] == [ProductRule]
    with pytest.raises(RobnetError, match="div of two perturbed tensors"):
        compile_network(Ratio())


def test_plain_forward_and_shared_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net = compile_network(model)
    x = torch.randn(5, 4)
    torch.testing.assert_close(net(x), model(x))
    assert {id(p) for p in net.parameters()} == {id(p) for p in model.parameters()}
    assert net.num_classes == 2


CORPUS_OK = ["vnn21_mnistfc_256x2.onnx", "vnn21_eran_mnist_relu_9_200.onnx", "vnn21_marabou_cifar10_small.onnx",
             "vnn21_cifar10_resnet_2b.onnx", "vnn21_verivital_Convnet_avgpool.onnx",
             "vnn21_oval21_cifar_base_kw.onnx", "vnn22_sri_resnet_a.onnx.gz", "ext_onnc_resnet20_cifar.onnx",
             # MaxPool (issue 12)
             "vnn21_verivital_Convnet_maxpool.onnx", "ext_baskov_mnist_cnn_dynbatch.onnx",
             "ext_cc_lenet_bn1d_batch10.onnx", "ext_jinsoo_lenet5_32x32.onnx", "ext_llf_tf2onnx_mnist.onnx"]


def _load_corpus(shared_dir, name):
    onnx = pytest.importorskip("onnx")
    onnx2torch = pytest.importorskip("onnx2torch")
    path = shared_dir / "corpus" / "onnx" / name
    model = onnx.load_model_from_string(gzip.open(path).read()) if name.endswith(".gz") else onnx.load(path)
    return onnx2torch.convert(model), model


@pytest.mark.parametrize("name", CORPUS_OK)
def test_corpus_models_compile_and_bound(shared_dir, name):
    from robnet_svc.graph import normalize_graph

    gm, model = _load_corpus(shared_dir, name)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    example = torch.rand(1, *dims[1:], dtype=torch.float32)
    gm = normalize_graph(gm.float(), example).eval()
    net = compile_network(gm)
    k = 2
    images = example.expand(2, *dims[1:])
    weights = torch.rand(2, k, *dims[1:]) * 1e-3
    aset = DenseAffineSet(weights, images.clone(), -torch.ones(2, k), torch.ones(2, k), torch.zeros(2, k), clip=None)
    labels = torch.tensor([0, 1])
    from robnet_svc.bounds.methods import IBP, RSIPIBP

    with torch.no_grad():
        y = gm(aset.images(aset.sample(64)).reshape(-1, *dims[1:])).reshape(2, 64, -1)
        for method in (IBP(), RSIPIBP()):
            lower = method.margin_lower(net, aset, labels)
            margins = y.gather(2, labels.view(2, 1, 1).expand(2, 64, 1)) - y
            others = torch.stack([torch.cat([m[:, :l], m[:, l + 1:]], 1) for m, l in zip(margins, labels)])
            assert (lower.unsqueeze(1) <= others + 1e-4 * (1 + others.abs())).all()
