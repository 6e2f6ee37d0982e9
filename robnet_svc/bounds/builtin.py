"""Built-in bound methods and op rules, registered through the public hooks (the same way
third-party plugins register theirs)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from robnet_svc.hookspecs import hookimpl


@hookimpl
def robnet_register_bound_methods(register):
    from robnet_svc.bounds.methods import BUILTIN_METHODS

    for cls in BUILTIN_METHODS:
        register(cls)


@hookimpl
def robnet_register_op_rules(register):
    from robnet_svc.bounds.ops.activations import activation_rules
    from robnet_svc.bounds.ops.arithmetic import ArithmeticRule
    from robnet_svc.bounds.ops.conv import ConvRule
    from robnet_svc.bounds.ops.linear import LinearRule, MatMulRule
    from robnet_svc.bounds.ops.norm import BatchNormRule
    from robnet_svc.bounds.ops.pool import AveragePoolRule, PadRule
    from robnet_svc.bounds.ops.relu import ReluRule
    from robnet_svc.bounds.ops.shape import IdentityRule, PermuteRule, ReshapeRule
    from robnet_svc.graph import BatchReshape

    table = {
        nn.Linear: LinearRule,
        torch.matmul: MatMulRule, operator.matmul: MatMulRule, torch.Tensor.matmul: MatMulRule,
        nn.Conv1d: ConvRule, nn.Conv2d: ConvRule,
        nn.BatchNorm1d: BatchNormRule, nn.BatchNorm2d: BatchNormRule,
        nn.ReLU: ReluRule, F.relu: ReluRule, torch.relu: ReluRule, torch.Tensor.relu: ReluRule,
        nn.AvgPool1d: AveragePoolRule, nn.AvgPool2d: AveragePoolRule,
        nn.AdaptiveAvgPool1d: AveragePoolRule, nn.AdaptiveAvgPool2d: AveragePoolRule,
        nn.ZeroPad2d: PadRule, nn.ConstantPad2d: PadRule, nn.ReflectionPad2d: PadRule,
        nn.ReplicationPad2d: PadRule, F.pad: PadRule,
        nn.Flatten: ReshapeRule, BatchReshape: ReshapeRule, nn.Unflatten: ReshapeRule,
        torch.flatten: ReshapeRule, torch.reshape: ReshapeRule, torch.squeeze: ReshapeRule,
        torch.unsqueeze: ReshapeRule, torch.Tensor.view: ReshapeRule, torch.Tensor.reshape: ReshapeRule,
        torch.Tensor.flatten: ReshapeRule, torch.Tensor.squeeze: ReshapeRule, torch.Tensor.unsqueeze: ReshapeRule,
        torch.permute: PermuteRule, torch.Tensor.permute: PermuteRule,
        nn.Identity: IdentityRule, nn.Dropout: IdentityRule, nn.Dropout1d: IdentityRule,
        nn.Dropout2d: IdentityRule, F.dropout: IdentityRule, torch.Tensor.contiguous: IdentityRule,
        operator.add: ArithmeticRule, operator.sub: ArithmeticRule, operator.mul: ArithmeticRule,
        operator.truediv: ArithmeticRule, torch.add: ArithmeticRule, torch.sub: ArithmeticRule,
        torch.mul: ArithmeticRule, torch.div: ArithmeticRule, torch.Tensor.add: ArithmeticRule,
        torch.Tensor.sub: ArithmeticRule, torch.Tensor.mul: ArithmeticRule, torch.Tensor.div: ArithmeticRule,
    }
    table.update(_onnx2torch_rules())
    table.update(activation_rules())
    for target, rule in table.items():
        register(target, rule)


def _onnx2torch_rules() -> dict:
    """Rules for the module classes onnx2torch produces, named by import path: importing
    onnx2torch's converters pulls in torchvision (seconds), which listing plugins does not need;
    the registry imports them when the engine asks for its rules (left out if not installed)."""
    from robnet_svc.bounds.ops.arithmetic import ArithmeticRule
    from robnet_svc.bounds.ops.linear import MatMulRule
    from robnet_svc.bounds.ops.pool import AveragePoolRule, PadRule
    from robnet_svc.bounds.ops.shape import IdentityRule, PermuteRule, ReshapeRule

    converters = "onnx2torch.node_converters"
    return {
        f"{converters}.binary_math_operations:OnnxBinaryMathOperation": ArithmeticRule,
        f"{converters}.matmul:OnnxMatMul": MatMulRule,
        f"{converters}.global_average_pool:OnnxGlobalAveragePool": AveragePoolRule,
        f"{converters}.global_average_pool:OnnxGlobalAveragePoolWithKnownInputShape": AveragePoolRule,
        f"{converters}.pad:OnnxPadStatic": PadRule,
        f"{converters}.pad:OnnxPadDynamic": PadRule,  # pads arrive as constant inputs (folded by normalize_graph)
        f"{converters}.flatten:OnnxFlatten": ReshapeRule,
        f"{converters}.reshape:OnnxReshape": ReshapeRule,
        f"{converters}.squeeze:OnnxSqueezeStaticAxes": ReshapeRule,
        f"{converters}.unsqueeze:OnnxUnsqueezeStaticAxes": ReshapeRule,
        f"{converters}.transpose:OnnxTranspose": PermuteRule,
        f"{converters}.dropout:OnnxDropoutDynamic": IdentityRule,
    }
