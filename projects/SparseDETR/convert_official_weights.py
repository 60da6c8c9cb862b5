#!/usr/bin/env python
"""Convert an authors' Sparse/Efficient/Deformable DETR checkpoint, or a backbone initialisation, for Detectron2.

    python projects/SparseDETR/convert_official_weights.py SRC DST

SRC: an authors' detector checkpoint (R50 or Swin-T; 91 COCO classes become Detectron2's 80), a
torchvision ResNet-50 state dict, the ImageNet Swin-T checkpoint, or an SCRL checkpoint.
DST: a checkpoint for MODEL.WEIGHTS. Also importable: ``sparse_detr.checkpoint.convert_checkpoint``.
"""
import argparse
import logging
import sys

from sparse_detr.checkpoint import convert_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to convert")
    parser.add_argument("dst", help="where to write the Detectron2 checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_checkpoint(args.src, args.dst)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
