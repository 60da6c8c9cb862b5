"""Pictures of what the sparse encoder kept: the updated tokens of each feature level over the image."""
from typing import List

import numpy as np

from .dam import updated_token_mask
from .transformer import TransformerOutput

__all__ = ["kept_token_masks", "draw_kept_tokens"]

LEVEL_COLORS = np.array([[255, 64, 64], [255, 200, 0], [64, 200, 255], [180, 90, 255], [90, 255, 120]], np.uint8)


def kept_token_masks(out: TransformerOutput, index: int) -> List[np.ndarray]:
    """Per level, an (H_l, W_l) bool map of the tokens the encoder updated for image ``index`` (its n_i best).

    Raises ValueError for a dense encoder (RHO = 0), which keeps every token.
    """
    if out.kept_tokens is None:
        raise ValueError("the model has a dense encoder (MODEL.SPARSE_DETR.RHO = 0): every token is updated")
    flat = updated_token_mask(out)[index].cpu()
    masks = []
    for (h, w), start in zip(out.spatial_shapes.tolist(), out.level_start_index.tolist()):
        masks.append(flat[start:start + h * w].view(h, w).numpy())
    return masks


def draw_kept_tokens(image: np.ndarray, masks: List[np.ndarray], input_size, padded_size=None,
                     alpha: float = 0.55) -> np.ndarray:
    """One panel per level, side by side: the image dimmed, kept tokens tinted in the level's colour.

    Args:
        image: (H, W, 3) uint8 RGB picture of the model's input image, at any scale.
        masks: from :func:`kept_token_masks`; each level's grid spans the padded batch input.
        input_size: (h, w) of the image as the model saw it; padded_size: (h, w) of the padded batch
            (defaults to ``input_size``, as for a batch of one image).
    """
    h, w = image.shape[:2]
    padded_h, padded_w = padded_size or input_size
    panels = []
    for level, mask in enumerate(masks):
        mh, mw = mask.shape
        rows = np.minimum((np.arange(h) * input_size[0] / h * mh / padded_h).astype(int), mh - 1)
        cols = np.minimum((np.arange(w) * input_size[1] / w * mw / padded_w).astype(int), mw - 1)
        on = mask[rows][:, cols]
        panel = image * 0.45
        panel[on] = (1 - alpha) * image[on] + alpha * LEVEL_COLORS[level % len(LEVEL_COLORS)]
        panels.append(panel.clip(0, 255).astype(np.uint8))
        panels.append(np.full((h, 4, 3), 255, np.uint8))
    return np.concatenate(panels[:-1], axis=1)
