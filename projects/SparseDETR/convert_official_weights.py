#!/usr/bin/env python
"""Convert an authors' Sparse/Efficient/Deformable DETR checkpoint, or a backbone initialisation, for Detectron2.

    python projects/SparseDETR/convert_official_weights.py SRC DST [--contiguous-classes]

SRC: an authors' detector checkpoint (R50 or Swin-T), a torchvision ResNet-50 state dict, the ImageNet
Swin-T checkpoint, or an SCRL checkpoint. The authors' COCO class heads keep their 91 rows (one per
COCO category id), which the paper configs' heads have (MODEL.SPARSE_DETR.CLASS_COLUMNS "dataset_ids");
--contiguous-classes keeps only the rows of the 80 used ids, for contiguous heads (a conversion that
changes the two-stage selection, hence the detections slightly).
DST: a checkpoint for MODEL.WEIGHTS. Also importable: ``sparse_detr.checkpoint.convert_checkpoint``.
"""
import argparse
import logging
import os
import sys

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
from sparse_detr.checkpoint import convert_checkpoint
from sparse_detr.cli import reports_user_errors


@reports_user_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to convert")
    parser.add_argument("dst", help="where to write the Detectron2 checkpoint")
    parser.add_argument("--contiguous-classes", action="store_true",
                        help="reduce the authors' 91-row COCO class heads to the 80 used ids (contiguous heads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.path.isdir(args.dst):
        raise IsADirectoryError(f"the destination {args.dst!r} is a folder: give the file to write, "
                                f"e.g. {os.path.join(args.dst, 'model.pth')}")
    convert_checkpoint(args.src, args.dst, args.contiguous_classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
