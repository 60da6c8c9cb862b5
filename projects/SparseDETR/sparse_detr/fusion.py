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
ResNet with GroupNorm, which cannot be folded, a CUDA model) is left as it is. In float32 (``winograd=True``), the
blocks' 3x3 convolutions of stride 1 with 64 channels or more in and out run by Winograd's F(4x4, 3x3)
(:class:`WinogradConv`): 4x fewer multiply-adds; ``SPARSE_DETR_WINOGRAD_TILE=2`` takes F(2x2, 3x3) instead (2.25x
fewer, 128 channels or more), rounded as closely as oneDNN's direct convolution (see :func:`winograd_tile`).

Where float32 matrix products run (:func:`float32_matmul_library`): PyTorch's BLAS (MKL on x86) or oneDNN. MKL is
fast on Intel's CPUs and slow on others (its fastest kernels are Intel's own), so on an x86 CPU of another maker
the float32 linear layers of the fast path and the Winograd products take oneDNN.
"""
import functools
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from .conv_workaround import narrowed, one_column_bf16, widened
from .layers.ms_deform_attn import compiled_cpu_ops_available

__all__ = ["FLOAT32_MATMUL_ENV", "WINOGRAD_TILE_ENV", "FusedConv", "PackedLinear", "WinogradConv", "cpu_vendor",
           "float32_matmul_library", "fuse_resnet", "max_pool_available", "pack_convolutions", "pack_linears",
           "stem_max_pool", "winograd_tile"]

_CONVOLUTION = torch.ops.mkldnn._convolution_pointwise
_CONVOLUTION_INTO = torch.ops.mkldnn._convolution_pointwise_.binary  # accumulates into its first argument


# auto | mkl | onednn: where the fast path's float32 matrix products run (read when a fast model is built)
FLOAT32_MATMUL_ENV = "SPARSE_DETR_FLOAT32_MATMUL"
FLOAT32_MATMUL_CHOICES = ("auto", "mkl", "onednn")


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def float32_matmul_library() -> str:
    """``"mkl"`` (PyTorch's BLAS: MKL on x86) or ``"onednn"``: where the fast path runs its float32 linear layers
    below :data:`PACKED_FLOAT32_MIN_ROWS` rows and its Winograd products. ``$SPARSE_DETR_FLOAT32_MATMUL`` (auto, mkl,
    onednn) chooses; auto is oneDNN on an x86 CPU not made by Intel, MKL elsewhere.

    Measured on a 2-core AMD EPYC (Zen 4), float32, 2 threads, medians of 21 interleaved runs: linear layers
    1.08-1.33x faster on oneDNN (1,995 x 256 -> 1024 5.4 against 6.9 ms; 300 x 256 -> 1024 0.77 against 1.01);
    the 16 Winograd products of a convolution at 800x1199 (oneDNN's grouped 1x1 convolution against MKL's batched
    matrix product) res3 9.9 against 20.7 ms, res4 9.7 against 11.7, res5 9.9 against 11.9. On the 2-core Xeon
    MKL was as fast or faster below 8,192 rows (see :data:`PACKED_FLOAT32_MIN_ROWS`)."""
    choice = os.environ.get(FLOAT32_MATMUL_ENV, "auto")
    if choice not in FLOAT32_MATMUL_CHOICES:
        raise ValueError(f"{FLOAT32_MATMUL_ENV}={choice!r}: expected one of {', '.join(FLOAT32_MATMUL_CHOICES)}")
    if choice != "auto":
        return choice
    vendor = cpu_vendor()
    return "onednn" if vendor and vendor != "GenuineIntel" and torch.backends.mkldnn.is_available() else "mkl"


def _fusable(conv: Optional[nn.Module]) -> bool:
    """A plain folded convolution: no norm and no activation left, zero padding."""
    return (isinstance(conv, D2Conv2d) and conv.norm is None and conv.activation is None
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


class _PackedWeight(nn.Module):
    """A layer whose weight is kept in oneDNN's own layout, packed again only when the weight changes (its dtype,
    storage or version) or, for a packing that depends on it, the input's shape. The packed weights are a cache:
    copies and pickles drop them and pack their own."""

    def packed(self, weight: Tensor, pack: Callable[[Tensor], Tensor], shape: Optional[Sequence[int]] = None,
               slot: str = "weight") -> Tensor:
        """``pack(weight)``, cached in ``slot`` until the weight, or ``shape`` where one is given, changes."""
        key = (weight.dtype, weight.data_ptr(), weight._version, None if shape is None else tuple(shape))
        cache = self.__dict__.setdefault("_packed_weights", {})
        if slot not in cache or cache[slot][0] != key:
            cache[slot] = (key, pack(weight.detach()))
        return cache[slot][1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_packed_weights", None)
        return state


class FusedConv(_PackedWeight):
    """``conv`` (a folded Detectron2 Conv2d) as one oneDNN call: ``relu?(conv(x) + bias [+ residual])``.

    The input (and the residual) are taken in the weight's dtype (bf16 weights: the fast path's bf16 backbone).
    The weight is reordered into oneDNN's own layout once (again only when it changes: its dtype, storage or
    version), as PyTorch's compiler does for frozen weights; unpacked, every call would reorder it, which cost
    more than the fusion saved (measured on the 2-core Xeon: ReLU and residual fused, 4-7 % off the bf16 model at
    800x1199 with packed weights, nothing with unpacked ones). oneDNN picks its kernel, and the weight layout that
    kernel reads, for the input's shape, so in float32 the weight is packed again when that changes: packed for
    another size, some convolutions ran many times slower (the AMD EPYC, res5's 512 -> 2048 1x1 at 13x19, packed
    for 25x38: 26 against 2.4 ms; the model packed at 800x1199 took 1.26-1.32x as long at 640x480 and 512x683;
    a stream of 7 sizes 1.08x as long as with packing for each, which costs 29 ms for the 57 convolutions). In
    bf16 the first input's packing serves every size as fast (the same stream: 0.93x, repacking's 17 ms a size
    cost more than it gained).
    """

    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        self.conv, self.relu = conv, relu
        # the convolution's geometry: as lists for oneDNN, and as nn.Conv2d's attributes for code that reads them
        # from the module (the padding-free input projections)
        self.kernel_size, self.padding, self.stride, self.dilation = (conv.kernel_size, conv.padding, conv.stride,
                                                                      conv.dilation)
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def _packed(self, x: Tensor) -> Tensor:
        padding, stride, dilation, groups = self.geometry
        return self.packed(self.conv.weight, lambda weight: torch.ops.mkldnn._reorder_convolution_weight(
            weight, padding, stride, dilation, groups, list(x.shape)),
            shape=x.shape if self.conv.weight.dtype == torch.float32 else None)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, into_residual: bool = False) -> Tensor:
        """``relu?(conv(x) + bias [+ residual])``; with ``into_residual``, written into ``residual`` (which must be in
        the weight's dtype, and which nobody else may still need): oneDNN's accumulating "sum" post-op, 1.1-2.6x
        faster than reading the residual as a second input (measured on the 2-core Xeon, bf16, 1x1 convolutions
        of ResNet-50's res2 and res4)."""
        bias = self.conv.bias
        padding, stride, dilation, groups = self.geometry
        x = x.to(self.conv.weight.dtype)
        if residual is None and one_column_bf16(x, x.dtype, self.kernel_size, self.stride, self.padding,
                                                self.dilation):
            return narrowed(self.forward(widened(x)))  # oneDNN's one-column bf16 bug (sparse_detr.conv_workaround)
        weight = self._packed(x)
        if residual is None:
            return _CONVOLUTION(x, weight, bias, padding, stride, dilation, groups, "relu" if self.relu else "none",
                                [], "")
        if into_residual and residual.dtype == weight.dtype and residual.is_contiguous(
                memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format):
            return _CONVOLUTION_INTO(residual, x, weight, bias, padding, stride, dilation, groups, "add", 1.0,
                                     "relu" if self.relu else None, [], "")
        return _CONVOLUTION.binary(x, residual.to(weight.dtype), weight, bias, padding, stride, dilation, groups,
                                   "add", None, "relu" if self.relu else None, [], "")


# G of F(M x M, 3x3) by tile size M: the transformed weight at each of a tile's (M + 2)^2 positions is G w G^T
# (csrc/winograd_cpu.cpp has B^T and A^T; F(4x4, 3x3)'s G carries the fractions its B^T leaves out)
_WINOGRAD_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (1 / 6, 1 / 6, 1 / 6), (1 / 6, -1 / 6, 1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}
WINOGRAD_TILES = tuple(_WINOGRAD_G)
# 4 | 2: the tile the fast path's Winograd convolutions take (read when a fast model is built; see winograd_tile)
WINOGRAD_TILE_ENV = "SPARSE_DETR_WINOGRAD_TILE"
WINOGRAD_TILE_CHOICES = ("4", "2")  # the default first
# The narrowest convolution (channels in and out) Winograd pays for, by tile: below it the products are too thin,
# and the transformed tiles too many, to pay for the transforms. F(2x2, 3x3), measured on the 2-core Xeon at
# 800x1199 against oneDNN's direct convolution (float32, the op alone, fastest of 9 interleaved runs, 1 / 2
# threads): ResNet-50's res4, 256 channels, 24.7 / 13.7 against 40.9 / 23.1 ms; res5, 512 channels, 28.4 / 16.0
# against 45.8 / 25.6 ms; res3, 128 channels, 27.9 / 16.5 against 39.3 / 24.4 ms; res2, 64 channels, 40.4 / 23.0
# against 35.1 / 23.2 ms (its transforms move 4x the bytes of its products). F(4x4, 3x3), whose transformed tiles
# are 2.25 values an output where F(2x2, 3x3)'s are 4, measured on the 2-core AMD EPYC (Zen 4) the same way with
# oneDNN's products (2 threads; F(4x4) / F(2x2) / direct): res2 13.5 / 22.7 / 19.7 ms, res3 9.5 / 15.4 / 19.8,
# res4 8.0 / 12.4 / 19.4, res5 7.9 / 11.3 / 19.2; with MKL's: 16.5 / 21.1 / 19.8, 12.2 / 17.0 / 19.8,
# 9.4 / 13.9 / 19.4, 10.0 / 12.7 / 19.6.
WINOGRAD_MIN_CHANNELS = {2: 128, 4: 64}


def winograd_tile() -> int:
    """The outputs a side of a tile of the fast path's Winograd convolutions: 4 (F(4x4, 3x3), the default: 4x fewer
    multiply-adds than the direct convolution, 1.4-1.7x faster than F(2x2, 3x3) on the 2-core AMD EPYC) or 2
    (F(2x2, 3x3): 2.25x fewer, rounded as closely as the direct convolution); ``$SPARSE_DETR_WINOGRAD_TILE``
    chooses."""
    choice = os.environ.get(WINOGRAD_TILE_ENV, WINOGRAD_TILE_CHOICES[0])
    if choice not in WINOGRAD_TILE_CHOICES:
        raise ValueError(f"{WINOGRAD_TILE_ENV}={choice!r}: expected one of {', '.join(WINOGRAD_TILE_CHOICES)}")
    return int(choice)


def winograd_weight(weight: Tensor, tile: int = 2) -> Tensor:
    """(K, C, 3, 3) -> ((tile + 2)^2, C, K): G w G^T at the positions of a tile of F(tile x tile, 3x3), computed in
    float64, as float32."""
    if tile not in _WINOGRAD_G:
        raise ValueError(f"winograd_weight: tile must be one of {WINOGRAD_TILES}, got {tile!r}")
    g = torch.tensor(_WINOGRAD_G[tile], dtype=torch.float64, device=weight.device)
    transformed = torch.einsum("ia,kcab,jb->ijck", g, weight.double(), g)
    return transformed.reshape(-1, weight.shape[1], weight.shape[0]).float().contiguous()


def winograd_available() -> bool:
    """Whether ``sparse_detr._C`` is loaded with its Winograd convolution (a build older than it has none)."""
    return compiled_cpu_ops_available("winograd_conv3x3", "winograd_input_tiles", "winograd_output_tiles")


def _winograd_fusable(conv: nn.Module, tile: int) -> bool:
    return (_fusable(conv) and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.weight.dtype == torch.float32
            and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS[tile])


class WinogradConv(_PackedWeight):
    """``conv`` (a folded 3x3 Detectron2 Conv2d of stride 1 and padding 1) in float32 as ``relu?(conv(x) + bias)``
    by Winograd's F(tile x tile, 3x3) (``csrc/winograd_cpu.cpp``; ``tile`` 2 or 4), with the transformed weight
    computed once (again only when the weight changes); see :data:`WINOGRAD_MIN_CHANNELS` for what it gains.
    ``products``: "mkl" takes the (tile + 2)^2 matrix products as one batched product
    (``torch.ops.sparse_detr_C.winograd_conv3x3``); "onednn" as one oneDNN 1x1 convolution of that many groups over
    the tiles (the transformed tiles, (tiles, P, C), are a channels-last (1, P C, tiles, 1) map) with its weight
    packed, between the op's two transforms."""

    def __init__(self, conv: nn.Conv2d, relu: bool, products: str = "mkl", tile: int = 2):
        super().__init__()
        if products not in ("mkl", "onednn"):
            raise ValueError(f"WinogradConv: products are computed by 'mkl' or 'onednn', got {products!r}")
        if tile not in WINOGRAD_TILES:
            raise ValueError(f"WinogradConv: tile must be one of {WINOGRAD_TILES}, got {tile!r}")
        self.conv, self.relu, self.products, self.tile = conv, relu, products, tile
        self.kernel_size, self.padding, self.stride, self.dilation = (conv.kernel_size, conv.padding, conv.stride,
                                                                      conv.dilation)

    def forward(self, x: Tensor) -> Tensor:
        x, bias = x.float(), self.conv.bias.float()
        if self.products == "mkl":
            weight = self.packed(self.conv.weight, lambda w: winograd_weight(w, self.tile))
            return torch.ops.sparse_detr_C.winograd_conv3x3(x, weight, bias, self.relu)
        if x.numel() == 0:  # nothing to multiply
            return torch.ops.sparse_detr_C.winograd_conv3x3(x, winograd_weight(self.conv.weight, self.tile), bias,
                                                            self.relu)
        batch, channels, height, width = x.shape
        tiles = torch.ops.sparse_detr_C.winograd_input_tiles(x, self.tile)  # (T, P, C)
        count, positions = tiles.shape[:2]
        grid = tiles.view(1, count, 1, positions * channels).permute(0, 3, 1, 2)  # (1, P C, T, 1), channels-last
        grouped = self.packed(self.conv.weight, lambda w: _grouped_winograd_weight(w, self.tile),
                              slot="grouped")  # in float64: once
        weight = self.packed(self.conv.weight, lambda _: torch.ops.mkldnn._reorder_convolution_weight(
            grouped, [0, 0], [1, 1], [1, 1], positions, list(grid.shape)), shape=grid.shape)
        products = _CONVOLUTION(grid, weight, None, [0, 0], [1, 1], [1, 1], positions, "none", [], "")
        products = products.permute(0, 2, 3, 1).reshape(count, positions, -1)  # (T, P, K): a view
        return torch.ops.sparse_detr_C.winograd_output_tiles(products, bias, self.relu, [batch, height, width],
                                                             self.tile)


def _grouped_winograd_weight(weight: Tensor, tile: int) -> Tensor:
    """(K, C, 3, 3) -> (P K, C, 1, 1): the transformed weight of each tile position as a group of a 1x1
    convolution."""
    transformed = winograd_weight(weight, tile)  # (P, C, K)
    return transformed.transpose(1, 2).reshape(-1, weight.shape[1], 1, 1).contiguous()


def max_pool_available() -> bool:
    """Whether ``sparse_detr._C`` is loaded with its stem max pool (a build older than it has none)."""
    return compiled_cpu_ops_available("max_pool3x3s2")


def stem_max_pool(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, 2, 1)``: on the CPU, for a channels-last float32, bf16 or uint8 map (the int8 backbone's
    codes, :mod:`sparse_detr.quantization`) without autograd, by ``torch.ops.sparse_detr_C.max_pool3x3s2``
    (``csrc/max_pool_cpu.cpp``), which gives the same elements without PyTorch's index of every maximum (2-core
    Xeon, 800x1199, two threads: 8 against 13-29 ms in float32, 6 against 15 ms in bf16). PyTorch's own pool fails
    on large uint8 maps: elsewhere they are pooled as float32."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.uint8) and x.dim() == 4
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=torch.channels_last) and max_pool_available()):
        return torch.ops.sparse_detr_C.max_pool3x3s2(x)
    if x.dtype == torch.uint8:
        return F.max_pool2d(x.float(), kernel_size=3, stride=2, padding=1).to(torch.uint8)
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class _FusedStem(nn.Module):
    """BasicStem: conv + ReLU in one call, then the 3x3 max pool (:func:`stem_max_pool`)."""

    def __init__(self, stem: BasicStem):
        super().__init__()
        self.conv1 = FusedConv(stem.conv1, relu=True)
        self.out_channels, self.stride = stem.out_channels, stem.stride

    def forward(self, x: Tensor) -> Tensor:
        return stem_max_pool(self.conv1(x))


class _FusedBlock(nn.Module):
    """A BottleneckBlock (three convolutions) or BasicBlock (two): the last one adds the shortcut and applies
    the ReLU as post-ops."""

    def __init__(self, block: nn.Module, input_is_private: bool = False, winograd: Optional[str] = None,
                 winograd_tile: int = 4):
        """``input_is_private``: the block's input is a tensor only this block reads (the previous block's output
        within a stage), so an identity shortcut may be overwritten by the sum; a projection shortcut's output
        always is. ``winograd`` ("mkl" or "onednn", the library of its products): inner 3x3 convolutions that
        qualify for ``winograd_tile`` run as :class:`WinogradConv` of that tile."""
        super().__init__()
        names = ["conv1", "conv2", "conv3"] if isinstance(block, BottleneckBlock) else ["conv1", "conv2"]
        convs = [getattr(block, name) for name in names]
        self.inner = nn.ModuleList(WinogradConv(conv, relu=True, products=winograd, tile=winograd_tile)
                                   if winograd and _winograd_fusable(conv, winograd_tile)
                                   else FusedConv(conv, relu=True) for conv in convs[:-1])
        self.last = FusedConv(convs[-1], relu=True)
        self.shortcut = None if block.shortcut is None else FusedConv(block.shortcut, relu=False)
        self.in_channels, self.out_channels, self.stride = block.in_channels, block.out_channels, block.stride
        self.sum_into_shortcut = self.shortcut is not None or input_is_private

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for conv in self.inner:
            out = conv(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.last(out, residual=shortcut, into_residual=self.sum_into_shortcut)


def _block_fusable(block: nn.Module) -> bool:
    if isinstance(block, BottleneckBlock):
        convs = [block.conv1, block.conv2, block.conv3]
    elif isinstance(block, BasicBlock):
        convs = [block.conv1, block.conv2]
    else:
        return False
    return all(_fusable(conv) for conv in convs) and (block.shortcut is None or _fusable(block.shortcut))


@torch.no_grad()
def fuse_resnet(backbone: nn.Module, winograd: bool = False) -> int:
    """Fuse the stem and every block of a folded Detectron2 ``ResNet`` on the CPU, in place; with ``winograd``
    (float32 weights), the blocks' 3x3 convolutions that qualify run as :class:`WinogradConv` when
    ``sparse_detr._C`` has it, of the tile :func:`winograd_tile` names, their products in
    :func:`float32_matmul_library`.

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
    products = float32_matmul_library() if winograd and winograd_available() else None
    tile = winograd_tile() if products else None
    for stage in backbone.stages:
        for index, block in enumerate(stage):
            # the first block's input is the stem's or a stage's output (a feature the ResNet may return)
            stage[index] = _FusedBlock(block, input_is_private=index > 0, winograd=products, winograd_tile=tile)
            fused += len(stage[index].inner) + 1 + (stage[index].shortcut is not None)
    return fused


@torch.no_grad()
def pack_convolutions(convs: nn.ModuleList) -> int:
    """Replace each ``convs[i][0]`` that is a plain ``nn.Conv2d`` on the CPU (the input projections, each followed
    by its GroupNorm) with a :class:`FusedConv` without post-op: the same convolution with its weight in oneDNN's
    layout once (unpacked, every call reorders it: the 3x3 extra-level convolution of ResNet-50's 2048-channel
    map spent a fifth of its time there). Returns how many were packed."""
    if not torch.backends.mkldnn.is_available():
        return 0
    packed = 0
    for sequence in convs:
        conv = sequence[0]
        if (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
                and conv.bias is not None and conv.weight.device.type == "cpu"):
            sequence[0] = FusedConv(conv, relu=False)
            packed += 1
    return packed


# float32 with MKL (float32_matmul_library): oneDNN from this many rows on; below, MKL's addmm was as fast or faster
# (measured on the 2-core Xeon, 2 threads: 19,947 x 256 -> 256 16.2-16.7 against 16.9-19.0 ms, -> 91 7.4-8.6
# against 10.6-23.4 ms, -> 128 9.3 against 13.3 ms; 1,995 x 256 -> 1024 6.8 against 6.2 ms). With "onednn": every
# float32 layer takes oneDNN.
PACKED_FLOAT32_MIN_ROWS = 8192


class PackedLinear(_PackedWeight):
    """``linear`` as one oneDNN call with its weight in oneDNN's layout (packed once, again only when it changes)
    and the bias added on the output tile: ``addmm`` first copies the broadcast bias into the whole output (an
    extra pass over, e.g., 20k tokens x 256 channels for every value projection at 800x1199). The input is taken
    in the weight's dtype, as a bf16 autocast would cast it; the output has that dtype too. A float32 layer takes
    oneDNN only for inputs of ``float32_min_rows`` rows or more (by default :data:`PACKED_FLOAT32_MIN_ROWS`: the
    tokens of a large image), ``F.linear`` below."""

    def __init__(self, linear: nn.Linear, float32_min_rows: int = PACKED_FLOAT32_MIN_ROWS):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.float32_min_rows = float32_min_rows

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.linear.weight.dtype == torch.float32 and x.numel() < self.float32_min_rows * x.shape[-1]:
            return F.linear(x.to(self.linear.weight.dtype), self.linear.weight, self.linear.bias)
        weight = self.packed(self.linear.weight, torch.ops.mkldnn._reorder_linear_weight)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.linear.weight.dtype), weight, self.linear.bias, "none",
                                                  [], "")


@torch.no_grad()
def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` child inside ``module`` (on the CPU) with a :class:`PackedLinear`; returns how many.
    A multi-head attention's layers are left alone (it reads their weights itself). Float32 layers take oneDNN for
    every input where :func:`float32_matmul_library` is "onednn", from :data:`PACKED_FLOAT32_MIN_ROWS` rows on
    where it is "mkl"."""
    if not torch.backends.mkldnn.is_available():
        return 0
    min_rows = 0 if float32_matmul_library() == "onednn" else PACKED_FLOAT32_MIN_ROWS
    packed = 0
    for parent in list(module.modules()):
        if isinstance(parent, (nn.MultiheadAttention, PackedLinear)):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in (
                    torch.float32, torch.bfloat16):
                setattr(parent, name, PackedLinear(child, min_rows))
                packed += 1
    return packed
