"""Backbones (Detectron2's ResNet in torchvision layout, Detectron2's Swin-T) and the sine position embedding."""
import math

import torch
from torch import Tensor, nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from detectron2.modeling.backbone.swin import SwinTransformer

__all__ = ["build_narrow_resnet_backbone", "build_swin_backbone", "sine_position_embedding"]


@BACKBONE_REGISTRY.register()
def build_narrow_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """A ResNet of basic blocks with any width, for small models trained from scratch (the CPU demo).

    Detectron2's ResNet-18/34 builder fixes the width at 64; this one reads ``MODEL.RESNETS.STEM_OUT_CHANNELS``,
    ``RES2_OUT_CHANNELS`` (doubled at each later stage), ``NARROW_BLOCKS`` (blocks per stage), ``NORM``,
    ``OUT_FEATURES`` and ``MODEL.BACKBONE.FREEZE_AT``, and builds Detectron2's own ResNet from BasicBlocks.
    """
    resnets = cfg.MODEL.RESNETS
    norm = resnets.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=resnets.STEM_OUT_CHANNELS, norm=norm)
    in_channels, out_channels = resnets.STEM_OUT_CHANNELS, resnets.RES2_OUT_CHANNELS
    stages = []
    for index, num_blocks in enumerate(resnets.NARROW_BLOCKS):
        stride = 1 if index == 0 else 2
        stages.append(ResNet.make_stage(BasicBlock, num_blocks, in_channels=in_channels, out_channels=out_channels,
                                        stride_per_block=[stride] + [1] * (num_blocks - 1), norm=norm))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=resnets.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Swin Transformer from ``cfg.MODEL.SWIN`` (Swin-T by default), outputs of stages ``OUT_INDICES``."""
    swin = cfg.MODEL.SWIN
    return SwinTransformer(
        patch_size=swin.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        drop_path_rate=swin.DROP_PATH_RATE,
        ape=swin.APE,
        patch_norm=swin.PATCH_NORM,
        out_indices=tuple(swin.OUT_INDICES),
        frozen_stages=swin.FROZEN_STAGES,
    )


def sine_position_embedding(mask: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Normalised sine embedding of a padding mask: (N, H, W) bool (True = padded) -> (N, 2 * num_feats, H, W).

    Cumulative sums of unpadded pixels along y and x, minus 0.5, divided by the last value (+1e-6),
    times 2 pi; sin on even and cos on odd frequencies, interleaved; the y block first, then x.
    Computed in float32, like the authors' code, whatever the model's dtype.
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)

    def embed(v):
        v = v[..., None] / dim_t
        return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((embed(y), embed(x)), dim=3).permute(0, 3, 1, 2)
