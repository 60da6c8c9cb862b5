"""A folded ResNet's convolutions fused with the ReLU and residual addition after them (inference on the CPU).

Once :func:`~sparse_detr.inference.fold_batch_norms` has folded the batch norms, every convolution of a Detectron2
ResNet is a convolution with bias, and its blocks apply the ReLU and the residual addition as separate passes
over the activations: each pass reads and writes the whole tensor once more (on the 2-core Xeon, half of the
bf16 backbone's time at 800x1199). oneDNN applies them as post-ops of the convolution, on its output tile while
it is still in cache: ``torch.ops.mkldnn._convolution_pointwise`` computes ``relu(conv(x) + b)`` and its
``binary`` overload ``relu(conv(x) + b + residual)``, the ops PyTorch's own compiler (Inductor) emits for these
patterns on the CPU. In float32 the fused and the separate passes give the same numbers (oneDNN runs the same
convolution); in bf16 the fused residual addition is rounded once instead of twice.

:func:`fuse_resnet` rewrites the stem and the blocks of a folded ResNet in place; anything else (a Swin, a
ResNet with GroupNorm, which cannot be folded, a CUDA model) is left as it is.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

__all__ = ["FusedConv", "fuse_resnet"]

_CONVOLUTION = torch.ops.mkldnn._convolution_pointwise


def _fusable(conv: Optional[nn.Module]) -> bool:
    """A plain folded convolution: no norm and no activation left, zero padding."""
    return (isinstance(conv, D2Conv2d) and conv.norm is None and conv.activation is None
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


class FusedConv(nn.Module):
    """``conv`` (a folded Detectron2 Conv2d) as one oneDNN call: ``relu?(conv(x) + bias [+ residual])``.

    The input (and the residual) are taken in the weight's dtype (bf16 weights: the fast path's bf16 backbone).
    The weight is reordered into oneDNN's own layout once (again only when it changes: its dtype, storage or
    version), as PyTorch's compiler does for frozen weights; unpacked, every call would reorder it, which cost
    more than the fusion saved (measured on the 2-core Xeon: ReLU and residual fused, 4-7 % off the bf16 model at
    800x1199 with packed weights, nothing with unpacked ones). The layout is chosen for the first input's size
    and serves any other.
    """

    def __init__(self, conv: D2Conv2d, relu: bool):
        super().__init__()
        self.conv, self.relu = conv, relu
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def __getstate__(self):  # copies and pickles repack (the packed weight is a cache of the weight)
        state = self.__dict__.copy()
        state.pop("_weight", None)
        state.pop("_key", None)
        return state

    def _packed(self, x: Tensor) -> Tensor:
        weight = self.conv.weight
        key = (weight.dtype, weight.data_ptr(), weight._version)
        if getattr(self, "_key", None) != key:
            padding, stride, dilation, groups = self.geometry
            self._weight = torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), padding, stride, dilation,
                                                                       groups, list(x.shape))
            self._key = key
        return self._weight

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        bias = self.conv.bias
        padding, stride, dilation, groups = self.geometry
        x = x.to(self.conv.weight.dtype)
        weight = self._packed(x)
        if residual is None:
            return _CONVOLUTION(x, weight, bias, padding, stride, dilation, groups, "relu" if self.relu else "none",
                                [], "")
        return _CONVOLUTION.binary(x, residual.to(weight.dtype), weight, bias, padding, stride, dilation, groups,
                                   "add", None, "relu" if self.relu else None, [], "")


class _FusedStem(nn.Module):
    """BasicStem: conv + ReLU in one call, then the 3x3 max pool."""

    def __init__(self, stem: BasicStem):
        super().__init__()
        self.conv1 = FusedConv(stem.conv1, relu=True)
        self.out_channels, self.stride = stem.out_channels, stem.stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class _FusedBlock(nn.Module):
    """A BottleneckBlock (three convolutions) or BasicBlock (two): the last one adds the shortcut and applies
    the ReLU as post-ops."""

    def __init__(self, block: nn.Module):
        super().__init__()
        names = ["conv1", "conv2", "conv3"] if isinstance(block, BottleneckBlock) else ["conv1", "conv2"]
        convs = [getattr(block, name) for name in names]
        self.inner = nn.ModuleList(FusedConv(conv, relu=True) for conv in convs[:-1])
        self.last = FusedConv(convs[-1], relu=True)
        self.shortcut = None if block.shortcut is None else FusedConv(block.shortcut, relu=False)
        self.in_channels, self.out_channels, self.stride = block.in_channels, block.out_channels, block.stride

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for conv in self.inner:
            out = conv(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.last(out, residual=shortcut)


def _block_fusable(block: nn.Module) -> bool:
    if isinstance(block, BottleneckBlock):
        convs = [block.conv1, block.conv2, block.conv3]
    elif isinstance(block, BasicBlock):
        convs = [block.conv1, block.conv2]
    else:
        return False
    return all(_fusable(conv) for conv in convs) and (block.shortcut is None or _fusable(block.shortcut))


@torch.no_grad()
def fuse_resnet(backbone: nn.Module) -> int:
    """Fuse the stem and every block of a folded Detectron2 ``ResNet`` on the CPU, in place.

    Returns the number of convolutions fused; 0 (and ``backbone`` unchanged) when it is not such a ResNet, when
    a convolution still has a norm (GroupNorm is not folded) or an activation, when it is not on the CPU, or
    when this PyTorch has no oneDNN.
    """
    if not isinstance(backbone, ResNet) or not torch.backends.mkldnn.is_available():
        return 0
    if any(p.device.type != "cpu" for p in backbone.parameters()):
        return 0
    blocks = [block for stage in backbone.stages for block in stage]
    if not isinstance(backbone.stem, BasicStem) or not _fusable(backbone.stem.conv1) or not all(
            _block_fusable(block) for block in blocks):
        return 0
    backbone.stem = _FusedStem(backbone.stem)
    fused = 1
    for stage in backbone.stages:
        for index, block in enumerate(stage):
            stage[index] = _FusedBlock(block)
            fused += len(stage[index].inner) + 1 + (stage[index].shortcut is not None)
    return fused
