"""The ``SparseDETR`` meta-architecture: Deformable DETR, its Top-k & BBR and Efficient DETR variants, Sparse DETR."""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from .backbone import sine_position_embedding
from .conv_workaround import guard_one_column_convolutions
from .criterion import HungarianMatcher, SetCriterion
from .dam import dam_recall_masses, output_dam, updated_token_mask
from .datasets import dataset_category_ids
from .transformer import FlatFeatures, SparseDeformableTransformer, TransformerOutput

__all__ = ["SparseDETR", "class_head_layout", "masked_group_norm"]

logger = logging.getLogger(__name__)
CLASS_LAYOUTS = ("contiguous", "dataset_ids")


def class_head_layout(cfg) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """``(class_columns, dataset_class_ids)`` of ``MODEL.SPARSE_DETR.CLASS_COLUMNS`` (see config.py).

    ``dataset_class_ids``: the category id of each contiguous class, from the metadata of the config's
    datasets, when it names NUM_CLASSES classes. ``class_columns``: the head column of each contiguous
    class, None for contiguous heads (column k = class k).
    """
    sd = cfg.MODEL.SPARSE_DETR
    if sd.CLASS_COLUMNS not in CLASS_LAYOUTS:
        raise ValueError(f"MODEL.SPARSE_DETR.CLASS_COLUMNS must be one of {CLASS_LAYOUTS}, got {sd.CLASS_COLUMNS!r}")
    by_ids = sd.CLASS_COLUMNS == "dataset_ids"
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    ids = dataset_category_ids(names, load=by_ids)
    if ids is not None and len(ids) != sd.NUM_CLASSES:
        if by_ids:
            logger.warning("CLASS_COLUMNS 'dataset_ids': the metadata of %s maps %d classes, NUM_CLASSES is %d: "
                           "contiguous class heads instead", names, len(ids), sd.NUM_CLASSES)
        ids = None
    elif ids is None and by_ids:
        logger.warning("CLASS_COLUMNS 'dataset_ids': no dataset of %s has thing_dataset_id_to_contiguous_id: "
                       "contiguous class heads instead", names)
    columns = ids if by_ids and ids is not None and ids != list(range(len(ids))) else None
    return columns, ids


def is_padded(images: ImageList) -> bool:
    """Whether an image of the batch is smaller than the batch tensor (host sizes: no device read)."""
    height, width = images.tensor.shape[-2:]
    return any((int(h), int(w)) != (height, width) for h, w in images.image_sizes)


def masked_group_norm(x: Tensor, norm: nn.GroupNorm, valid: Tensor) -> Tensor:
    """``norm`` (a GroupNorm) with statistics over the valid positions only; 0 at the others.

    Args:
        x: (N, C, H, W); valid: (N, H, W) bool, True at an image's unpadded positions.
    """
    n, c, h, w = x.shape
    groups = norm.num_groups
    weight = valid.to(x.dtype).view(n, 1, 1, h, w)
    grouped = x.view(n, groups, c // groups, h, w)
    count = weight.sum((2, 3, 4), keepdim=True).clamp(min=1) * (c // groups)
    mean = (grouped * weight).sum((2, 3, 4), keepdim=True) / count
    var = ((grouped - mean).square() * weight).sum((2, 3, 4), keepdim=True) / count
    normalised = ((grouped - mean) * (var + norm.eps).rsqrt() * weight).view(n, c, h, w)
    return normalised * norm.weight.view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1) * weight.view(n, 1, h, w)


@META_ARCH_REGISTRY.register()
class SparseDETR(nn.Module):
    """Sparse DETR (Roh et al., ICLR'22) and the detectors it generalises, switched by the transformer's flags.

    Input and output follow Detectron2: ``forward(batched_inputs)`` returns the weighted loss dict in
    training and ``[{"instances": Instances}]`` in evaluation. With ``report_dam_recall`` a sparse model
    also adds ``"dam_recall": {"kept_mass": (L,), "total_mass": (L,)}`` to each evaluation output: the
    image's decoder attention map mass per level on the updated tokens and in all (see
    :class:`~sparse_detr.evaluation.DAMRecallEvaluator`).
    """

    # Set by the fast inference path: when no level is padded, positions are embedded once a row and once a column
    # (_unpadded_positions); the plain path computes them as the authors' code does.
    position_embedding_by_rows_and_columns = False

    @configurable
    def __init__(self, *, backbone: Backbone, in_features: List[str], transformer: SparseDeformableTransformer,
                 criterion: SetCriterion, pixel_mean, pixel_std, num_feature_levels: int,
                 num_detections: int = 100, report_dam_recall: bool = False,
                 class_columns: Optional[Sequence[int]] = None, dataset_class_ids: Optional[Sequence[int]] = None,
                 padding_invariant: bool = False):
        """
        Args:
            class_columns: the class heads' column of each contiguous class (the dataset's category ids when
                the heads have a column per id, as the authors' 91-column COCO models); None: column k = class k.
            dataset_class_ids: the dataset's category id of each contiguous class, when known (lets the
                checkpointer pick the rows of a category-id checkpoint for contiguous heads).
            padding_invariant: the backbone runs on each image at its own size, and the input projections'
                GroupNorm takes its statistics over each image's unpadded positions and zeroes the others (which
                the extra levels' convolutions then see); with the transformer's ``padding_invariant``, an
                image's detections do not depend on the padding of its batch. Off in the authors' model.
        """
        super().__init__()
        self.backbone = backbone
        self.in_features = in_features
        self.transformer = transformer
        self.criterion = criterion
        self.num_detections = num_detections
        self.report_dam_recall = report_dam_recall
        d_model = transformer.d_model
        channels = [backbone.output_shape()[f].channels for f in in_features]
        if d_model % 32:
            raise ValueError(f"HIDDEN_DIM must be a multiple of 32 (GroupNorm(32) on the input projections), got {d_model}")
        projections = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in channels]
        in_channels = channels[-1]
        for _ in range(num_feature_levels - len(channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, d_model, 3, stride=2, padding=1),
                                             nn.GroupNorm(32, d_model)))
            in_channels = d_model
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        num_columns = self.transformer.class_embed[0].out_features
        if class_columns is not None:
            columns = list(class_columns)
            if len(set(columns)) != len(columns) or min(columns) < 0 or max(columns) >= num_columns:
                raise ValueError(f"class_columns must be distinct columns of the {num_columns}-column class heads, "
                                 f"got {columns}")
            class_columns = torch.tensor(columns, dtype=torch.long)
        self.register_buffer("class_columns", class_columns, False)
        self.dataset_class_ids = list(dataset_class_ids) if dataset_class_ids is not None else None
        self.padding_invariant = padding_invariant
        # oneDNN's bf16 convolutions of stride 2 with a one-column output read memory they did not write (narrow
        # images under a bf16 autocast on the CPU): such calls get two zero columns more (exact; see the module)
        guard_one_column_convolutions(self)

    @classmethod
    def from_config(cls, cfg):
        if torch.device(cfg.MODEL.DEVICE).type == "cuda" and not torch.cuda.is_available():
            # (else the first tensor moved to it fails deep inside PyTorch, naming a missing NVIDIA driver)
            raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but PyTorch finds no CUDA GPU here: set MODEL.DEVICE "
                             "cpu (demo.py: --opts MODEL.DEVICE cpu; train_net.py: MODEL.DEVICE cpu after the options)")
        sd = cfg.MODEL.SPARSE_DETR
        class_columns, dataset_class_ids = class_head_layout(cfg)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = sorted(shapes, key=lambda f: shapes[f].stride)
        if sd.NUM_FEATURE_LEVELS < len(in_features):
            in_features = in_features[len(in_features) - sd.NUM_FEATURE_LEVELS:]
        transformer = SparseDeformableTransformer(
            num_classes=max(class_columns) + 1 if class_columns else sd.NUM_CLASSES, d_model=sd.HIDDEN_DIM,
            nhead=sd.NHEADS, num_encoder_layers=sd.ENC_LAYERS,
            num_decoder_layers=sd.DEC_LAYERS, dim_feedforward=sd.DIM_FEEDFORWARD, dropout=sd.DROPOUT,
            num_feature_levels=sd.NUM_FEATURE_LEVELS, enc_n_points=sd.ENC_N_POINTS, dec_n_points=sd.DEC_N_POINTS,
            num_queries=sd.NUM_QUERIES, two_stage=sd.TWO_STAGE, with_box_refine=sd.WITH_BOX_REFINE,
            eff_query_init=sd.EFF_QUERY_INIT, eff_specific_head=sd.EFF_SPECIFIC_HEAD, rho=sd.RHO,
            use_enc_aux_loss=sd.USE_ENC_AUX_LOSS, padding_invariant=sd.PADDING_INVARIANT)
        matcher = HungarianMatcher(sd.SET_COST_CLASS, sd.SET_COST_BBOX, sd.SET_COST_GIOU, sd.FOCAL_ALPHA, sd.FOCAL_GAMMA)
        criterion = SetCriterion(
            matcher, weight_ce=sd.CLS_LOSS_COEF, weight_bbox=sd.BBOX_LOSS_COEF, weight_giou=sd.GIOU_LOSS_COEF,
            weight_mask_prediction=sd.MASK_PREDICTION_COEF, focal_alpha=sd.FOCAL_ALPHA, focal_gamma=sd.FOCAL_GAMMA,
            class_agnostic_two_stage=not sd.EFF_SPECIFIC_HEAD)
        return {"backbone": backbone, "in_features": in_features, "transformer": transformer, "criterion": criterion,
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "num_feature_levels": sd.NUM_FEATURE_LEVELS, "num_detections": sd.NUM_DETECTIONS,
                "report_dam_recall": cfg.TEST.DAM_RECALL, "class_columns": class_columns,
                "dataset_class_ids": dataset_class_ids, "padding_invariant": sd.PADDING_INVARIANT}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---- input ---------------------------------------------------------------------------------------

    # Inference only (set by the fast inference path on the CPU, sparse_detr.inference): the images normalised straight
    # into the layout the backbone reads, channels-last in its dtype (float32, bf16, or the int8 backbone's uint8 codes
    # of its (scale, zero point)), padding included, one pass over each image (torch.ops.sparse_detr_C.normalize_image;
    # at 800x1199 on two threads of the AMD EPYC 0.3-0.4 ms, against 2.1-2.5 ms for normalising, converting and
    # reordering apart). The same values as normalising and converting apart. None: as the model trains.
    backbone_input: Optional[Tuple[torch.dtype, Optional[Tuple[float, int]]]] = None  # (dtype, uint8 codes' qparams)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        if self.backbone_input is not None and not torch.is_grad_enabled():
            images = [x["image"] for x in batched_inputs]
            channels = self.pixel_mean.numel()
            if images and all(image.device.type == "cpu" and image.dim() == 3 and image.shape[0] == channels
                              and image.dtype in (torch.uint8, torch.float32) for image in images):
                return self._backbone_images(images)
        images = [((x["image"].to(self.device) - self.pixel_mean) / self.pixel_std) for x in batched_inputs]
        return ImageList.from_tensors(images)

    def _backbone_images(self, images: List[Tensor]) -> ImageList:
        dtype, codes = self.backbone_input
        scale, zero_point = codes if codes is not None else (1.0, 0)
        sizes = [(image.shape[1], image.shape[2]) for image in images]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        shape = (len(images), height, width, images[0].shape[0])
        if all(size == (height, width) for size in sizes):
            batch = torch.empty(shape, dtype=dtype)
        else:  # padded with the code or value of 0 (a normalised image's padding)
            batch = torch.full(shape, zero_point if codes is not None else 0, dtype=dtype)
        mean, std = self.pixel_mean.view(-1), self.pixel_std.view(-1)
        for index, (image, (h, w)) in enumerate(zip(images, sizes)):
            torch.ops.sparse_detr_C.normalize_image(image, mean, std, batch[index, :h, :w], scale, zero_point)
        return ImageList(batch.permute(0, 3, 1, 2), sizes)  # (N, C, H, W), channels-last

    def project_levels(self, images: ImageList) -> Tuple[List[Tensor], List[Tensor]]:
        """Every level's projected map (N, C, H_l, W_l) and padding mask (N, H_l, W_l), True on padding.

        The masks are host tensors: each level's is the image mask resized with nearest interpolation, or,
        with ``padding_invariant``, the extent of each image's own maps.
        """
        if self.padding_invariant and is_padded(images):
            return self._padding_free_levels(images)  # (a batch without padding needs nothing special)
        features = self.backbone(images.tensor)
        maps = [proj(features[f]) for proj, f in zip(self.input_proj, self.in_features)]
        for proj in self.input_proj[len(maps):]:
            maps.append(proj(features[self.in_features[-1]] if len(maps) == len(self.in_features) else maps[-1]))
        _, _, height, width = images.tensor.shape
        sizes = torch.tensor([[int(h), int(w)] for h, w in images.image_sizes])  # (N, 2) (h, w); ints when traced
        # The image mask is padded rows | padded columns, and nearest interpolation resizes each axis on its own:
        # each level's mask is its resized rows | its resized columns (the image-sized mask is never made).
        padded_rows = (torch.arange(height)[None, :] >= sizes[:, 0, None]).float()[:, None, :, None]  # (N, 1, H, 1)
        padded_columns = (torch.arange(width)[None, :] >= sizes[:, 1, None]).float()[:, None, None, :]  # (N, 1, 1, W)
        masks = []
        for m in maps:
            h, w = m.shape[-2:]
            rows = F.interpolate(padded_rows, size=(h, 1)).bool()[:, 0]  # (N, h, 1)
            columns = F.interpolate(padded_columns, size=(1, w)).bool()[:, 0]  # (N, 1, w)
            masks.append(rows | columns)
        return maps, masks

    def _padding_free_levels(self, images: ImageList) -> Tuple[List[Tensor], List[Tensor]]:
        """The backbone on each image at its own size, GroupNorm over each image's own map extent."""
        alone = [self.backbone(images.tensor[i:i + 1, :, :h, :w]) for i, (h, w) in enumerate(images.image_sizes)]
        maps, masks = [], []
        for level, proj in enumerate(self.input_proj):
            conv = proj[0]
            if level < len(self.in_features):
                name = self.in_features[level]
                x = ImageList.from_tensors([a[name][0] for a in alone]).tensor  # padded with zeros
                extents = [tuple(a[name].shape[-2:]) for a in alone]
            else:  # an extra level: a convolution of the last map, the backbone's raw one for the first
                x = x if level == len(self.in_features) else maps[-1]
                extents = [tuple((e + 2 * conv.padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1)
                                 // conv.stride[d] + 1 for d, e in enumerate(extent)) for extent in extents]
            x_projected = conv(x)
            rows, columns = torch.tensor(extents).unbind(1)
            mask = ((torch.arange(x_projected.shape[-2])[None, :, None] >= rows[:, None, None])
                    | (torch.arange(x_projected.shape[-1])[None, None, :] >= columns[:, None, None]))
            maps.append(masked_group_norm(x_projected, proj[1], ~mask.to(x.device)))
            masks.append(mask)
        return maps, masks

    def flatten_features(self, images: ImageList) -> FlatFeatures:
        """Backbone, input projections and extra levels, masks, position and level embeddings, flattened.

        Masks are made on the host (:meth:`project_levels`), and every count derived from them stays a host
        value. When no image is padded, the token counts follow from the level shapes alone (no mask is read),
        so a model traced or exported for one input size has them as constants.
        """
        maps, level_masks = self.project_levels(images)
        n = images.tensor.shape[0]
        by_rows_and_columns = self.position_embedding_by_rows_and_columns and not any(
            bool(mask.any()) for mask in level_masks)  # host masks
        tokens, pos, masks, shapes, valid_sizes = [], [], [], [], []
        for level, (feature, mask) in enumerate(zip(maps, level_masks)):
            valid_sizes.append(torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1))
            masks.append(mask.flatten(1))
            shapes.append(feature.shape[-2:])
            tokens.append(feature.flatten(2).transpose(1, 2))
            if by_rows_and_columns:
                continue
            level_pos = sine_position_embedding(mask.to(self.device), feature.shape[1] // 2).to(feature.dtype)
            # in the features' dtype: bf16 on the fast path, where adding float32 to bf16 tokens costs 5x a bf16 add
            level_embed = self.transformer.level_embed[level].to(feature.dtype)
            pos.append(level_pos.flatten(2).transpose(1, 2) + level_embed.view(1, 1, -1))
        spatial_shapes = torch.tensor(shapes, dtype=torch.long)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        padding_mask = torch.cat(masks, 1)
        valid_sizes = torch.stack(valid_sizes, 1)  # (N, L, 2) (w, h)
        valid_ratios = valid_sizes.float() / spatial_shapes.flip(-1).float()
        level_shapes = [(int(h), int(w)) for h, w in shapes]
        valid_token_counts = (~padding_mask).sum(1).tolist() if is_padded(images) else [padding_mask.shape[1]] * n
        to_device = dict(device=self.device, non_blocking=True)
        return FlatFeatures(
            tokens=torch.cat(tokens, 1),
            pos=self._unpadded_positions(maps) if by_rows_and_columns else torch.cat(pos, 1),
            padding_mask=padding_mask.to(**to_device),
            spatial_shapes=spatial_shapes.to(**to_device), level_shapes=level_shapes,
            level_start_index=level_start_index.to(**to_device), valid_ratios=valid_ratios.to(**to_device),
            valid_sizes=valid_sizes.to(**to_device), valid_token_counts=valid_token_counts)

    def _unpadded_positions(self, maps: List[Tensor]) -> Tensor:
        """(N, S, C) position + level embeddings of unpadded levels (the fast path), written once into the flattened
        tokens' layout: a level's y half depends on the row only and its x half on the column only, so each is
        embedded (``sine_position_embedding`` of one column and of one row) and given its half of the level
        embedding once, then broadcast; the values of the per-level path bit for bit (the same float32 operations
        on the same inputs, then the same cast and addition), one pass over the tokens instead of three."""
        n, channels = maps[0].shape[:2]
        half = channels // 2
        dtype = maps[0].dtype
        pos = torch.empty(n, sum(m.shape[2] * m.shape[3] for m in maps), channels, dtype=dtype, device=self.device)
        start = 0
        for level, feature in enumerate(maps):
            h, w = feature.shape[-2:]
            rows = sine_position_embedding(torch.zeros(1, h, 1, dtype=torch.bool, device=self.device), half)
            columns = sine_position_embedding(torch.zeros(1, 1, w, dtype=torch.bool, device=self.device), half)
            level_embed = self.transformer.level_embed[level].to(dtype)
            y = rows[0, :half, :, 0].t().to(dtype) + level_embed[:half]  # (H, C / 2)
            x = columns[0, half:, 0, :].t().to(dtype) + level_embed[half:]  # (W, C / 2)
            grid = pos[:, start:start + h * w].view(n, h, w, channels)
            grid[..., :half].copy_(y.view(1, h, 1, half).expand(n, h, w, half))
            grid[..., half:].copy_(x.view(1, 1, w, half).expand(n, h, w, half))
            start += h * w
        return pos

    def predict(self, batched_inputs: List[Dict], detections_only: bool = False) -> TransformerOutput:
        """Raw predictions of every output set (see :class:`TransformerOutput`), for analysis tools.

        They include every decoder layer's logits and boxes, the two-stage and encoder auxiliary outputs,
        the kept-token indices with n_i per image, the decoder's sampling locations and attention weights
        (the DAM's ingredients), and the (h, w) of each image as the model saw it.
        ``postprocess(out, batched_inputs)`` turns them into Detectron2 results. ``detections_only`` skips
        what neither the detections nor the DAM need (see :meth:`SparseDeformableTransformer.forward`).
        """
        images = self.preprocess_image(batched_inputs)
        out = self.transformer(self.flatten_features(images), detections_only)
        out.image_sizes = images.image_sizes
        return out

    # ---- forward -------------------------------------------------------------------------------------

    def forward(self, batched_inputs: List[Dict]):
        out = self.predict(batched_inputs)
        if not self.training:
            return self.evaluation_outputs(out, batched_inputs)
        dtype = torch.promote_types(out.pred_boxes[-1].dtype, torch.float32)  # float32 under autocast
        targets = self.prepare_targets(batched_inputs, out.image_sizes, dtype)
        metrics = {}
        losses = self.criterion(out, targets, metrics)
        try:
            storage = get_event_storage()
        except AssertionError:  # outside a trainer: nowhere to log
            storage = None
        if storage is not None:
            storage.put_scalars(**metrics)
        return losses

    def class_logits(self, logits: Tensor) -> Tensor:
        """(..., columns) head logits -> (..., K) logits of the dataset's classes, in contiguous order."""
        return logits if self.class_columns is None else logits.index_select(-1, self.class_columns)

    def evaluation_outputs(self, out: TransformerOutput, batched_inputs: List[Dict]) -> List[Dict]:
        """What ``forward`` returns in evaluation: the detections, and the DAM recall's masses when reported."""
        results = self.postprocess(out, batched_inputs)
        if self.report_dam_recall and out.kept_tokens is not None:
            masses = torch.stack(dam_recall_masses(output_dam(out), updated_token_mask(out), out.padding_mask,
                                                   out.spatial_shapes), 1).cpu()  # one transfer: (N, 2, L)
            for r, (kept, total) in zip(results, masses):
                r["dam_recall"] = {"kept_mass": kept, "total_mass": total}
        return results

    def postprocess(self, out: TransformerOutput, batched_inputs: List[Dict]) -> List[Dict]:
        """``[{"instances": Instances}]`` in each input's requested "height" x "width" (default: its own size)."""
        results = self.inference(self.class_logits(out.pred_logits[-1]), out.pred_boxes[-1], out.image_sizes)
        return [{"instances": detector_postprocess(r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1]))}
                for r, x in zip(results, batched_inputs)]

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes, dtype: torch.dtype):
        """Ground truth as normalised cxcywh boxes relative to each (unpadded) input image, labels as head columns."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            if "instances" not in x:
                raise ValueError("training needs ground truth: every input dict must have 'instances'")
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=dtype, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor.to(dtype) / scale, "xyxy", "cxcywh")
            labels = inst.gt_classes if self.class_columns is None else self.class_columns[inst.gt_classes]
            targets.append({"labels": labels, "boxes": boxes})
        return targets

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes) -> List[Instances]:
        """Top detections over queries x classes; boxes to absolute xyxy of each (unpadded) input image.

        Args:
            logits: (N, Q, K) logits of the dataset's classes (:meth:`class_logits`); boxes: (N, Q, 4) cxcywh.
        """
        scores, classes, boxes = self.top_detections(logits, boxes)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            r = Instances((h, w))
            r.pred_boxes = Boxes(boxes[i] * boxes.new_tensor([w, h, w, h]))
            r.scores = scores[i]
            r.pred_classes = classes[i]
            results.append(r)
        return results

    def top_detections(self, logits: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The top D = min(NUM_DETECTIONS, Q x K) (query, class) pairs of each image by sigmoid score, batched.

        Args:
            logits: (N, Q, K) logits of the dataset's classes (:meth:`class_logits`); boxes: (N, Q, 4) cxcywh.
        Returns:
            scores (N, D), classes (N, D) int64 contiguous ids, boxes (N, D, 4) xyxy normalised to the image.
        """
        num_classes = logits.shape[-1]
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_detections, logits[0].numel()), dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        boxes = box_convert(boxes, "cxcywh", "xyxy").gather(1, query[..., None].expand(-1, -1, 4))
        return scores, index % num_classes, boxes
