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
        nn.Flatten: ReshapeRule,
        # by import path: the import package loads onnx, which listing plugins does not need
        "robnet_svc.onnx_io.normalize:BatchReshape": ReshapeRule, nn.Unflatten: ReshapeRule,
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
    table.update(_structural_rules())
    table.update(_onnx2torch_rules())
    table.update(_onnx2torch_structural_rules())
    table.update(activation_rules())
    for target, rule in table.items():
        register(target, rule)


def _structural_rules() -> dict:
    """MaxPool, Concat, slicing, Split, Gather, transpose, Reduce, Resize; refused normalisations."""
    from robnet_svc.bounds.ops.maxpool import MaxPoolRule
    from robnet_svc.bounds.ops.structural import (ConcatRule, ReduceRule, ResizeRule, SelectRule, SplitRule,
                                                  TransposeRule, UnsupportedNormRule)

    return {
        nn.MaxPool1d: MaxPoolRule, nn.MaxPool2d: MaxPoolRule, F.max_pool1d: MaxPoolRule, F.max_pool2d: MaxPoolRule,
        torch.max_pool1d: MaxPoolRule, torch.max_pool2d: MaxPoolRule,
        torch.cat: ConcatRule, torch.concat: ConcatRule,
        operator.getitem: SelectRule, torch.narrow: SelectRule, torch.Tensor.narrow: SelectRule,
        torch.index_select: SelectRule, torch.Tensor.index_select: SelectRule,
        torch.split: SplitRule, torch.Tensor.split: SplitRule, torch.chunk: SplitRule, torch.Tensor.chunk: SplitRule,
        torch.transpose: TransposeRule, torch.Tensor.transpose: TransposeRule,
        torch.swapaxes: TransposeRule, torch.Tensor.swapaxes: TransposeRule,
        torch.mean: ReduceRule, torch.Tensor.mean: ReduceRule, torch.sum: ReduceRule, torch.Tensor.sum: ReduceRule,
        F.interpolate: ResizeRule, nn.Upsample: ResizeRule, nn.UpsamplingNearest2d: ResizeRule,
        nn.UpsamplingBilinear2d: ResizeRule,
        nn.LayerNorm: UnsupportedNormRule, nn.GroupNorm: UnsupportedNormRule, nn.InstanceNorm1d: UnsupportedNormRule,
        nn.InstanceNorm2d: UnsupportedNormRule, F.layer_norm: UnsupportedNormRule, F.group_norm: UnsupportedNormRule,
        F.instance_norm: UnsupportedNormRule, nn.Softmax: UnsupportedNormRule, F.softmax: UnsupportedNormRule,
        torch.softmax: UnsupportedNormRule, torch.Tensor.softmax: UnsupportedNormRule,
    }


def _onnx2torch_structural_rules() -> dict:
    """onnx2torch's classes for the ops of ``_structural_rules`` (MaxPool is ``nn.MaxPool*``)."""
    from robnet_svc.bounds.ops.structural import (ConcatRule, ReduceRule, ResizeRule, SelectRule, SplitRule,
                                                  UnsupportedNormRule)

    c = "onnx2torch.node_converters"  # by import path, as in _onnx2torch_rules
    return {
        f"{c}.concat:OnnxConcat": ConcatRule,
        f"{c}.slice:OnnxSlice": SelectRule, f"{c}.slice:OnnxSliceV9": SelectRule, f"{c}.gather:OnnxGather": SelectRule,
        f"{c}.split:OnnxSplit": SplitRule, f"{c}.split:OnnxSplit13": SplitRule,
        f"{c}.reduce:OnnxReduceStaticAxes": ReduceRule, f"{c}.reduce:OnnxReduceSumStaticAxes": ReduceRule,
        f"{c}.reduce:OnnxReduceSumDynamicAxes": ReduceRule,
        f"{c}.resize:OnnxResize": ResizeRule, f"{c}.resize:OnnxResizeV10": ResizeRule,
        f"{c}.layer_norm:OnnxLayerNorm": UnsupportedNormRule, f"{c}.instance_norm:OnnxInstanceNorm": UnsupportedNormRule,
        f"{c}.activations:OnnxSoftmaxV1V11": UnsupportedNormRule,
    }


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
