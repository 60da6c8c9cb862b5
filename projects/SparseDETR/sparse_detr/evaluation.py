"""Evaluation beside COCO AP: the DAM recall of a sparse encoder over a whole dataset."""
from typing import Dict

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .dam import dam_recall_summary

__all__ = ["DAMRecallEvaluator"]


class DAMRecallEvaluator(DatasetEvaluator):
    """Share of the decoder attention map's mass on the tokens the sparse encoder updated (the authors' "corr").

    Reads the ``"dam_recall"`` entry a Sparse DETR model adds to each evaluation output (TEST.DAM_RECALL)
    and pools the masses over every image and worker, so each level's recall weighs images by the mass
    they put on that level. Returns ``{"dam_recall": {"dam_recall": r, "dam_recall_level0": r0, ...}}``,
    fractions in [0, 1]; nothing when no output carried the entry (a dense encoder).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._kept, self._total = None, None  # (L,) sums over the images seen, once one carried masses

    def process(self, inputs, outputs):
        for output in outputs:
            if "dam_recall" not in output:
                continue
            masses = output["dam_recall"]
            kept, total = masses["kept_mass"].double().cpu(), masses["total_mass"].double().cpu()
            if self._kept is None:
                self._kept, self._total = torch.zeros_like(kept), torch.zeros_like(total)
            self._kept += kept
            self._total += total

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        gathered = comm.gather((self._kept, self._total), dst=0)
        if not comm.is_main_process():
            return {}
        parts = [(k, t) for k, t in gathered if k is not None]
        if not parts:
            return {}
        kept = torch.stack([k for k, _ in parts]).sum(0)
        total = torch.stack([t for _, t in parts]).sum(0)
        return {"dam_recall": dam_recall_summary(kept, total)}
