"""The deformable transformer of (Sparse) Deformable DETR: sparse encoder, two-stage proposals, decoder, heads.

Paper names: the scoring network predicts the decoder cross-attention map (DAM) from backbone tokens;
the encoder updates only the top-rho tokens (queries) while attending to the whole token map (keys);
encoder auxiliary heads detect objects from the selected tokens; the two-stage head picks the top
proposals whose boxes initialise the decoder (Efficient DETR's query initialisation optionally also
takes their content).
"""
import copy
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MSDeformAttn, UnprojectedValues

__all__ = ["SparseDeformableTransformer", "TransformerOutput", "FlatFeatures", "inverse_sigmoid", "kept_token_count"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def kept_token_count(valid_tokens: int, rho: float) -> int:
    """n = floor(rho * valid tokens) + 1, the tokens the sparse encoder updates, in float32 like the authors' code.

    A host int, so a model traced or exported for one input size has it as a constant.
    """
    return int(np.floor(np.float32(valid_tokens) * np.float32(rho))) + 1


def sine_box_embedding(boxes_unact: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of sigmoid(boxes): (N, Q, 4) logits -> (N, Q, 4 * num_feats), x, y, w, h blocks."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes_unact.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = boxes_unact.sigmoid()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)


def _cell_centres(h: int, w: int, device) -> Tuple[Tensor, Tensor]:
    """(H, W) grids of cell-centre x and y in cells (j + 0.5, i + 0.5), float32 like the authors' code."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                            torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    return xs, ys


class MLP(nn.Module):
    """Box head: ``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class TokenScorer(nn.Module):
    """Scoring network: one logit per token predicting whether the decoder will attend to it (the DAM).

    LayerNorm -> Linear -> GELU, then the second half of the features is averaged over the image's
    tokens (global context) and concatenated to the first half (local), then an MLP d -> d/2 -> d/4 -> 1.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                    nn.Linear(dim // 4, 1))

    def forward(self, tokens: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """(N, S, C) -> (N, S) logits; the global context averages all tokens, or the ``valid`` ones (N, S)."""
        z = self.layer1(tokens)
        local, global_ = z.split(z.shape[-1] // 2, dim=-1)
        if valid is None:
            global_ = global_.mean(dim=1, keepdim=True)
        else:
            weights = valid.to(global_.dtype)[..., None]
            global_ = (global_ * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        global_ = global_.expand_as(local)
        return self.layer2(torch.cat([local, global_], dim=-1)).squeeze(-1)


class EncoderLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        """query (N, Lq, C) attends to memory (N, S, C); returns the updated query and the attention sampling."""
        attn = self.self_attn(query + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                              padding_mask)
        x = self.norm1(query + self.dropout1(attn.output))
        x = self.norm2(x + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(x))))))
        return x, attn


class DecoderLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn.output))
        tgt = self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
        return tgt, attn


@dataclass
class FlatFeatures:
    """All feature levels flattened into one token axis (S = sum of H_l * W_l).

    Every shape and count here that depends on image sizes was computed on the host, from the
    padding masks, so the sparse selection needs no device synchronisation; ``level_shapes`` and
    ``valid_token_counts`` are Python ints, so a traced or exported model sees them as constants.
    """

    tokens: Tensor  # (N, S, C) projected backbone features
    pos: Tensor  # (N, S, C) sine position embedding + level embedding
    padding_mask: Tensor  # (N, S) bool, True at padded tokens
    spatial_shapes: Tensor  # (L, 2) int64 (H, W)
    level_shapes: List[Tuple[int, int]]  # the same (H, W) of each level, on the host
    level_start_index: Tensor  # (L,)
    valid_ratios: Tensor  # (N, L, 2) (w, h) share of unpadded columns / rows of each level
    valid_sizes: Tensor  # (N, L, 2) (w, h) unpadded columns / rows of each level
    valid_token_counts: List[int]  # per image, unpadded tokens over all levels

    @property
    def value_mask(self) -> Optional[Tensor]:
        """The padding mask for the attention's values; None when nothing is padded (known on the host)."""
        return self.padding_mask if sum(self.valid_token_counts) < self.padding_mask.numel() else None


@dataclass
class TransformerOutput:
    """Raw predictions of every output set, for the criterion, inference and analysis tools."""

    pred_logits: List[Tensor]  # per decoder layer, (N, Q, K)
    pred_boxes: List[Tensor]  # per decoder layer, (N, Q, 4) normalised cxcywh
    enc_logits: Optional[Tensor] = None  # two-stage head, (N, S, K)
    enc_boxes: Optional[Tensor] = None  # (N, S, 4)
    query_tokens: Optional[Tensor] = None  # two-stage, (N, Q) the tokens whose proposals became the queries
    enc_aux_logits: List[Tensor] = field(default_factory=list)  # per encoder layer but the last, (N, k, K)
    enc_aux_boxes: List[Tensor] = field(default_factory=list)  # (N, k, 4)
    token_scores: Optional[Tensor] = None  # (N, S) scoring-network logits, padded tokens set to the batch minimum
    kept_tokens: Optional[Tensor] = None  # (N, k) indices of the selected tokens, best first
    sparse_token_nums: Optional[Tensor] = None  # (N,) n_i, the tokens written back per image
    dec_sampling_locations: Optional[Tensor] = None  # (N, D, Q, M, L, P, 2)
    dec_attention_weights: Optional[Tensor] = None  # (N, D, Q, M, L, P)
    spatial_shapes: Optional[Tensor] = None
    level_start_index: Optional[Tensor] = None
    padding_mask: Optional[Tensor] = None  # (N, S)
    image_sizes: List[Tuple[int, int]] = field(default_factory=list)  # (h, w) of each input, set by the meta-arch


class SparseDeformableTransformer(nn.Module):
    """Encoder (dense or sparse), two-stage proposals, decoder with optional box refinement, and the heads.

    The class and box heads are laid out as the authors' lists: decoder layers ``0 .. D-1``, then the
    two-stage head at ``D``, then the encoder auxiliary heads; without box refinement and encoder
    auxiliary loss a single head (index 0) serves all of them.
    """

    def __init__(self, *, num_classes: int, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 num_queries: int = 300, two_stage: bool = False, with_box_refine: bool = False,
                 eff_query_init: bool = False, eff_specific_head: bool = False, rho: float = 0.0,
                 use_enc_aux_loss: bool = False, padding_invariant: bool = False):
        """
        Args:
            padding_invariant: the scoring network's global context averages each image's unpadded tokens
                only, and padded tokens never become two-stage queries (the authors' model: neither).
        """
        super().__init__()
        if eff_query_init and not two_stage:
            raise ValueError("EFF_QUERY_INIT takes its queries from the two-stage proposals: it needs TWO_STAGE")
        if use_enc_aux_loss and rho <= 0:
            raise ValueError("USE_ENC_AUX_LOSS applies to the sparse encoder's selected tokens: it needs RHO > 0")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"RHO is a keeping ratio in [0, 1], got {rho}")
        self.d_model, self.num_queries = d_model, num_queries
        self.two_stage, self.with_box_refine = two_stage, with_box_refine
        self.eff_query_init, self.eff_specific_head = eff_query_init, eff_specific_head
        self.rho, self.use_enc_aux_loss = rho, use_enc_aux_loss
        self.padding_invariant = padding_invariant
        self.num_decoder_layers, self.num_encoder_layers = num_decoder_layers, num_encoder_layers

        layer_args = (d_model, dim_feedforward, dropout, num_feature_levels, nhead)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(*layer_args, enc_n_points) for _ in range(num_encoder_layers))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(DecoderLayer(*layer_args, dec_n_points) for _ in range(num_decoder_layers))
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage or rho > 0:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        if rho > 0:
            self.enc_mask_predictor = TokenScorer(d_model)
        if two_stage:
            self.pos_trans = nn.Linear(2 * d_model, d_model if eff_query_init else 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(d_model if eff_query_init else 2 * d_model)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)

        self.separate_heads = with_box_refine or use_enc_aux_loss
        num_heads = num_decoder_layers + int(two_stage) + (num_encoder_layers - 1) * int(use_enc_aux_loss)
        class_head, box_head = nn.Linear(d_model, num_classes), MLP(d_model, d_model, 4, 3)
        count = num_heads if self.separate_heads else 1
        self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(count))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(count))
        self._reset_parameters()

    def _reset_parameters(self):
        # Xavier for the transformer's matrices; the heads and the query embedding keep PyTorch's defaults
        # (nn.Linear's, N(0, 1) for the embedding), as in the authors' model where they live outside it
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith(("class_embed.", "bbox_embed.", "query_embed.")):
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in self.class_embed:
            nn.init.constant_(head.bias, prior_bias)
        for i, head in enumerate(self.bbox_embed):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
            nn.init.constant_(head.layers[-1].bias[2:], 0.0 if self.two_stage or i > 0 else -2.0)

    def _head(self, index: int):
        i = index if self.separate_heads else 0
        return self.class_embed[i], self.bbox_embed[i]

    # ---- token-grid geometry (depends on masks only) -------------------------------------------------

    @staticmethod
    def encoder_reference_points(flat: FlatFeatures) -> Tensor:
        """(N, S, L, 2): each token's cell centre normalised by its level's valid size, seen on every level."""
        points = []
        for level, (h, w) in enumerate(flat.level_shapes):
            xs, ys = _cell_centres(h, w, flat.tokens.device)
            ratio = flat.valid_ratios[:, None, level]
            points.append(torch.stack([xs.reshape(1, -1) / (ratio[..., 0] * w), ys.reshape(1, -1) / (ratio[..., 1] * h)], -1))
        return torch.cat(points, 1)[:, :, None] * flat.valid_ratios[:, None]

    @staticmethod
    def proposals(flat: FlatFeatures):
        """Two-stage proposals of every token: (N, S, 4) logits (+inf where padded or invalid), (N, S) validity."""
        boxes = []
        for level, (h, w) in enumerate(flat.level_shapes):
            xs, ys = _cell_centres(h, w, flat.tokens.device)
            centres = torch.stack([xs, ys], -1).reshape(1, -1, 2) / flat.valid_sizes[:, None, level]
            sizes = torch.full_like(centres, 0.05 * 2.0 ** level)
            boxes.append(torch.cat([centres, sizes], -1))
        boxes = torch.cat(boxes, 1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~flat.padding_mask
        logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid[..., None], float("inf"))
        return logits, valid

    # Inference only (set by the fast inference path on the CPU): the tokens that are not valid proposals (padding,
    # and the cells next to an image's border: 938 of the 19,947 at 800x1199) enter the two-stage projection as zeros,
    # so their rows come out as a zero token's. Every token is projected as it is instead and that row is written
    # over theirs: the same values, without a pass over every token to zero them (1.5 ms a call at 800x1199 on two
    # threads, 2 calls an image; a GPU keeps the pass, which needs no host sync).
    project_invalid_tokens_after = False

    def _project_memory(self, tokens: Tensor, valid: Tensor) -> Tensor:
        if not self.project_invalid_tokens_after or torch.is_grad_enabled():
            # where() rather than masked_fill(): the same values, 2x faster with the mask broadcast over channels
            return self.enc_output_norm(self.enc_output(torch.where(valid[..., None], tokens, 0.0)))
        projected = self.enc_output_norm(self.enc_output(tokens))
        invalid = (~valid).nonzero(as_tuple=True)
        if len(invalid[0]) > 0:
            zero_token = self.enc_output_norm(self.enc_output(tokens.new_zeros(1, 1, tokens.shape[-1])))
            projected[invalid] = zero_token.view(-1)
        return projected

    def _levels_sampled_first(self, attn: MSDeformAttn, num_queries: int, level_shapes: Sequence[Tuple[int, int]]
                              ) -> int:
        """How many levels, from the first (the largest), ``attn`` with ``num_queries`` queries samples before
        projecting: the number that costs the fewest multiply-adds. Per channel and image, sampling level l first
        costs Lq * M * P * 4 * TAP_COST (each head samples all C channels) where projecting its S_l tokens first
        costs S_l * C + Lq * P * 4 * TAP_COST; projecting the samples of the levels sampled first costs Lq * C, and
        projecting some levels while sampling others first SPLIT_COST more (a second projection and attention
        call). At 800x1199 the decoder's 300 queries sample every level first and the sparse encoder's 2,000 the
        first two (18,750 of the 19,947 tokens); on a small image (1k tokens) 300 queries project first."""
        taps = num_queries * attn.n_points * 4 * self.TAP_COST  # of one level, one channel
        projected = [h * w * self.d_model + taps for h, w in level_shapes]
        best, best_cost = 0, sum(projected)
        for first in range(1, len(level_shapes) + 1):
            cost = (num_queries * self.d_model + first * taps * attn.n_heads + sum(projected[first:])
                    + (self.SPLIT_COST if first < len(level_shapes) else 0))
            if cost < best_cost:
                best, best_cost = first, cost
        return best

    # A bilinear tap of one channel in multiply-adds of a matrix multiplication, and the fixed cost of projecting
    # some levels and sampling others first, per channel: float32 on the 2-core AMD EPYC (Zen 4), two threads, one
    # attention of 256 channels, 8 heads, 4 levels of 4 points at 800x1199 (19,947 tokens) with the sampling
    # first for its first 0 / 1 / 2 / 3 / 4 levels: 300 queries 18.2 / 8.5 / 5.7 / 4.7 / 4.2 ms, 2,000 queries
    # 28.7 / 20.2 / 19.6 / 21.6 / 26.1 ms (projection by MKL, 18 ms for all the tokens; the fast path's oneDNN
    # projection takes 13.6). (Round 7's estimate on the 2-core Xeon, before the kernel sampled 256 channels 128 at
    # a time, was 12 multiply-adds a tap.)
    TAP_COST = 4
    SPLIT_COST = 150_000

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, flat: FlatFeatures, detections_only: bool = False) -> TransformerOutput:
        """Every output set; with ``detections_only``, only what the detections and the DAM need.

        ``detections_only`` skips the encoder auxiliary heads, the two-stage box head on tokens that do not
        become queries (``enc_boxes`` stays None) and the predictions of every decoder layer but the last
        (``pred_logits`` and ``pred_boxes`` then hold the last layer only). The last layer's predictions, the
        kept tokens and the DAM's ingredients are those of the full computation.
        """
        out = TransformerOutput(pred_logits=[], pred_boxes=[], spatial_shapes=flat.spatial_shapes,
                                level_start_index=flat.level_start_index, padding_mask=flat.padding_mask)
        need_proposals = self.two_stage or self.rho > 0
        proposals, proposal_valid = self.proposals(flat) if need_proposals else (None, None)
        memory, values = self._encode(flat, proposals, proposal_valid, out, detections_only)
        tgt, query_pos, reference = self._init_queries(flat, memory, values, proposals, proposal_valid, out,
                                                       detections_only)
        self._decode(flat, memory, values, tgt, query_pos, reference, out, detections_only)
        return out

    # Inference under autocast (the bf16 fast path): every layer that projects the memory (the sparse encoder's value
    # projections, the two-stage head's, the decoder's) would cast all of it to the autocast dtype again (at
    # 800x1199, 13 casts of 20k x 256 tokens an image). The memory is cast once instead; the sparse encoder keeps
    # that copy up to date with its kept rows. The same values reach the layers, so the same detections come out.
    # With autograd the layers keep their own casts (their gradients reach the memory in float32, as before).
    @staticmethod
    def _shared_values(memory: Tensor) -> Tensor:
        """``memory`` in the dtype that autocast gives a linear layer's input, when autocast is on and autograd off;
        else ``memory`` itself."""
        device = memory.device.type
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(device):
            return memory
        return memory.to(torch.get_autocast_dtype(device))

    def _select_tokens(self, flat: FlatFeatures, proposal_valid: Tensor, out: TransformerOutput):
        """Score every token, keep the top n_i = floor(rho * valid_i) + 1 per image (k = max n_i for all).
        Returns the kept tokens (N, k), n_i (N,) and whether every image writes all k back (n_i >= k, on the host)."""
        scores = self.enc_mask_predictor(self._project_memory(flat.tokens + flat.pos, proposal_valid),
                                         ~flat.padding_mask if self.padding_invariant else None)
        scores = scores.masked_fill(flat.padding_mask, scores.min())
        sparse_token_nums = [kept_token_count(count, self.rho) for count in flat.valid_token_counts]
        k = min(max(sparse_token_nums), scores.shape[1])
        out.token_scores = scores
        out.kept_tokens = scores.topk(k, dim=1).indices
        out.sparse_token_nums = torch.tensor(sparse_token_nums).to(scores.device, non_blocking=True)
        return out.kept_tokens, out.sparse_token_nums, all(count >= k for count in sparse_token_nums)

    def _encode(self, flat: FlatFeatures, proposals, proposal_valid, out: TransformerOutput,
                detections_only: bool = False) -> Tuple[Tensor, Tensor]:
        """(the memory (N, S, C), the values its projections read: the memory, or its copy of
        :meth:`_shared_values`)."""
        reference = self.encoder_reference_points(flat)
        memory = flat.tokens
        attn_args = (flat.spatial_shapes, flat.level_start_index, flat.value_mask)
        if self.rho <= 0:
            for layer in self.encoder.layers:
                memory, _ = layer(memory, flat.pos, reference, memory, *attn_args)
            return memory, self._shared_values(memory)

        kept, sparse_token_nums, all_written_back = self._select_tokens(flat, proposal_valid, out)
        k = kept.shape[1]
        # tokens beyond n_i of an image keep being updated as queries but are not written back
        write_back = (torch.arange(k, device=kept.device)[None] < sparse_token_nums[:, None])[..., None]
        # without autograd the tokens are copied once and updated in place: an out-of-place scatter copies all
        # of them at every layer (at 800x1199, 20k tokens of which 10 % change)
        in_place = not torch.is_grad_enabled()
        if in_place and detections_only:
            # the queries in token order (out.kept_tokens keeps the best-first order): neighbouring queries then
            # sample neighbouring values, which the attention finds in cache (20-25 % off its time at 800x1199)
            kept, order = kept.sort(dim=1)
            write_back = write_back.gather(1, order[..., None])

        n, num_tokens = memory.shape[:2]
        # without autograd, rows of the (N * S, ...) tokens: index_select copies each kept row whole, where gather
        # reads an index per element (at 800x1199, 2k x 256 of 20k tokens: 0.2 against 1 ms)
        rows = (kept + torch.arange(n, device=kept.device)[:, None] * num_tokens).flatten() if in_place else None

        def gather(x):
            if rows is not None:
                return x.reshape(n * num_tokens, *x.shape[2:]).index_select(0, rows).view(n, k, *x.shape[2:])
            return x.gather(1, kept.view(*kept.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))

        query, query_pos, query_ref = gather(memory), gather(flat.pos), gather(reference)
        auxiliary = self.use_enc_aux_loss and not detections_only
        query_proposals = gather(proposals) if auxiliary else None
        index = kept[..., None].expand(-1, -1, memory.shape[-1])
        if in_place:
            # rows of the (N * S, C) copy: index_copy_ moves k rows an image, where an in-place scatter with the
            # expanded index copied all S rows twice (at 800x1199, 18 ms of 6 layers' 20k x 256 tokens)
            memory = memory.clone(memory_format=torch.contiguous_format)
        values = attended = self._shared_values(memory)
        if (in_place and self.project_values_after_sampling and self.encoder.layers[0].self_attn.projects_samples
                and flat.value_mask is None and values.dtype == torch.float32):
            # the largest levels sampled before projecting where that costs less (float32: in bf16 the projection
            # runs at twice the rate, and sampling the encoder's level 0 first gained nothing measurable); the
            # values are the memory itself, updated in place below (nothing padded, so nothing to zero)
            first = self._levels_sampled_first(self.encoder.layers[0].self_attn, k, flat.level_shapes)
            if first > 0:
                attended = UnprojectedValues.of(values, None, first)
        for lid, layer in enumerate(self.encoder.layers):
            query, _ = layer(query, query_pos, query_ref, attended, *attn_args)
            if in_place and all_written_back:  # (one image, or equal n_i): no old rows to keep
                update = query
            else:
                update = torch.where(write_back, query, gather(memory))
            if in_place:
                update = update.reshape(-1, memory.shape[-1])
                memory.view(-1, memory.shape[-1]).index_copy_(0, rows, update)
                if values is not memory:
                    values.view(-1, values.shape[-1]).index_copy_(0, rows, update.to(values.dtype))
            else:
                memory = values = attended = memory.scatter(1, index, update)
            if auxiliary and lid < self.num_encoder_layers - 1:
                class_head, box_head = self._head(self.num_decoder_layers + 1 + lid)
                out.enc_aux_logits.append(class_head(query))
                out.enc_aux_boxes.append((box_head(query) + query_proposals).sigmoid())
        return memory, values

    def _init_queries(self, flat: FlatFeatures, memory: Tensor, values: Tensor, proposals, proposal_valid,
                      out: TransformerOutput, detections_only: bool = False):
        n = memory.shape[0]
        if not self.two_stage:
            query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            return tgt, query_pos, self.reference_points(query_pos).sigmoid()

        class_head, box_head = self._head(self.num_decoder_layers)
        projected = self._project_memory(values, proposal_valid)  # (the memory, or its copy for the layers)
        out.enc_logits = class_head(projected)
        objectness = out.enc_logits.max(-1).values if self.eff_specific_head else out.enc_logits[..., 0]
        if self.padding_invariant:
            objectness = objectness.masked_fill(flat.padding_mask, float("-inf"))
        topk = objectness.topk(self.num_queries, dim=1).indices
        out.query_tokens = topk
        if detections_only:  # the box head on the queries' tokens alone
            selected = projected.gather(1, topk[..., None].expand(-1, -1, projected.shape[-1]))
            boxes_unact = (proposals.gather(1, topk[..., None].expand(-1, -1, 4)) + box_head(selected)).detach()
        else:
            enc_boxes_unact = proposals + box_head(projected)
            out.enc_boxes = enc_boxes_unact.sigmoid()
            boxes_unact = enc_boxes_unact.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
        embedding = sine_box_embedding(boxes_unact, self.d_model // 2).to(memory.dtype)
        pos = self.pos_trans_norm(self.pos_trans(embedding))
        if self.eff_query_init:
            tgt = memory.gather(1, topk[..., None].expand(-1, -1, memory.shape[-1]))
            query_pos = pos
        else:
            query_pos, tgt = pos.split(self.d_model, dim=2)
        return tgt, query_pos, boxes_unact.sigmoid()

    # Inference only (set by the fast inference path on the CPU: float32, and bf16 without AMX): the decoder's
    # cross-attentions sample the memory before projecting it (MSDeformAttn._sample_then_project) when that costs
    # fewer multiply-adds, and so does the sparse encoder in float32; each only where its attentions can
    # (MSDeformAttn.projects_samples: not the int8 path's encoder).
    project_values_after_sampling = False

    def _decode(self, flat: FlatFeatures, memory, values, tgt, query_pos, reference, out: TransformerOutput,
                detections_only: bool = False):
        """``values``: what the cross-attentions' value projections read (the memory, or its copy of
        :meth:`_shared_values`)."""
        locations, weights = [], []
        if (self.project_values_after_sampling and not torch.is_grad_enabled()
                and self.decoder.layers[0].cross_attn.projects_samples):
            first = self._levels_sampled_first(self.decoder.layers[0].cross_attn, tgt.shape[1], flat.level_shapes)
            if first > 0:
                values = UnprojectedValues.of(memory, flat.value_mask, first)
        for lid, layer in enumerate(self.decoder.layers):
            ratios = flat.valid_ratios if reference.shape[-1] == 2 else torch.cat([flat.valid_ratios] * 2, -1)
            tgt, attn = layer(tgt, query_pos, reference[:, :, None] * ratios[:, None], values, flat.spatial_shapes,
                              flat.level_start_index, flat.value_mask)
            locations.append(attn.sampling_locations)
            weights.append(attn.attention_weights)
            class_head, box_head = self._head(lid)
            last = lid == len(self.decoder.layers) - 1
            if detections_only and not (last or self.with_box_refine):
                continue
            delta = box_head(tgt)
            if reference.shape[-1] == 4:
                boxes = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            if last or not detections_only:
                out.pred_logits.append(class_head(tgt))
                out.pred_boxes.append(boxes)
            if self.with_box_refine:
                reference = boxes.detach()
        out.dec_sampling_locations = torch.stack(locations, 1)
        out.dec_attention_weights = torch.stack(weights, 1)
