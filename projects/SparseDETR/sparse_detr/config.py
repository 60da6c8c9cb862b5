"""Config keys of Sparse DETR, added to a Detectron2 config by :func:`add_sparse_detr_config`."""
from detectron2.config import CfgNode as CN

__all__ = ["add_sparse_detr_config"]


def add_sparse_detr_config(cfg):
    """Add ``cfg.MODEL.SPARSE_DETR`` and the solver keys of the DETR recipe; defaults follow the paper."""
    cfg.MODEL.SPARSE_DETR = CN()
    sd = cfg.MODEL.SPARSE_DETR
    # Classes of the dataset (80 for COCO): the model reports them as Detectron2's contiguous ids 0 .. K-1.
    sd.NUM_CLASSES = 80
    # Layout of the class heads' columns (the classification logits inside the model):
    # * "contiguous": NUM_CLASSES columns, column k = contiguous class k (the default for own datasets);
    # * "dataset_ids": one column per category id of the dataset, 0 .. max id, column i = category id i,
    #   the ids taken from the metadata of DATASETS.TRAIN[0] (else TEST[0]): thing_dataset_id_to_contiguous_id.
    #   For COCO these are the authors' 91 columns (ids 0 .. 90, 80 of them used), with which their
    #   released models were trained. Every column takes part inside the model (two-stage objectness and
    #   query selection, every loss); detections are the top NUM_DETECTIONS (query, class) pairs over the
    #   columns of the dataset's classes, reported as contiguous ids. When the metadata has no id mapping or
    #   maps another number of classes than NUM_CLASSES, the layout falls back to "contiguous" (with a warning).
    sd.CLASS_COLUMNS = "contiguous"
    # An image's detections independent of the batch it is in (of the padding to the batch's largest image):
    # the backbone runs on each image at its own size (its maps padded with zeros afterwards), the input
    # projections' GroupNorm and the scoring network's global context take only the image's unpadded
    # positions, and padded tokens never become two-stage queries. The authors' model (False) computes
    # all of these over the padded batch, so its outputs change slightly with the batch; the demo model,
    # whose backbone is trained from scratch with GroupNorm, uses True. It gives up batching in the backbone.
    sd.PADDING_INVARIANT = False
    # Fine-tuning on another dataset: class heads whose size differs from the checkpoint's (MODEL.WEIGHTS)
    # keep their fresh initialisation instead of being an error; everything else is loaded.
    sd.REINIT_CLASS_HEADS = False
    # Object queries of the decoder (and top-k proposals of the two-stage head), N in the paper.
    sd.NUM_QUERIES = 300
    # Transformer width d and attention heads M.
    sd.HIDDEN_DIM = 256
    sd.NHEADS = 8
    # Encoder and decoder layers.
    sd.ENC_LAYERS = 6
    sd.DEC_LAYERS = 6
    # Hidden size of the feed-forward networks (ReLU).
    sd.DIM_FEEDFORWARD = 1024
    # Dropout in the transformer layers.
    sd.DROPOUT = 0.1
    # Feature levels L: the backbone's outputs plus extra stride-2 levels made from the last one.
    sd.NUM_FEATURE_LEVELS = 4
    # Sampling points K per head and level in encoder and decoder deformable attention.
    sd.ENC_N_POINTS = 4
    sd.DEC_N_POINTS = 4
    # Two-stage: the decoder's initial boxes are the top-scoring encoder proposals ("Top-k").
    sd.TWO_STAGE = False
    # Iterative bounding-box refinement in the decoder ("BBR").
    sd.WITH_BOX_REFINE = False
    # Efficient DETR query initialisation: decoder content queries are the selected encoder tokens.
    sd.EFF_QUERY_INIT = False
    # Efficient DETR class-specific two-stage head: objectness = max class logit (else class 0 alone).
    sd.EFF_SPECIFIC_HEAD = False
    # Keeping ratio rho of the sparse encoder: the share of tokens the encoder updates; 0 = dense encoder.
    sd.RHO = 0.0
    # Auxiliary detection heads and losses on the selected tokens after each encoder layer but the last.
    sd.USE_ENC_AUX_LOSS = False
    # Loss weights: focal classification, L1 box, generalised IoU, and the DAM prediction loss.
    sd.CLS_LOSS_COEF = 2.0
    sd.BBOX_LOSS_COEF = 5.0
    sd.GIOU_LOSS_COEF = 2.0
    sd.MASK_PREDICTION_COEF = 1.0
    # Costs of the Hungarian matcher: classification (focal), L1 box, generalised IoU.
    sd.SET_COST_CLASS = 2.0
    sd.SET_COST_BBOX = 5.0
    sd.SET_COST_GIOU = 2.0
    # Focal loss alpha and gamma, also used by the matcher's classification cost.
    sd.FOCAL_ALPHA = 0.25
    sd.FOCAL_GAMMA = 2.0
    # Detections kept per image at inference (top-k over queries x classes).
    sd.NUM_DETECTIONS = 100

    # Solver keys of the DETR recipe (SPEC section 4).
    # Learning-rate factor of the backbone (2e-5 = 2e-4 x 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning-rate factor of the sampling-offset and reference-point linear layers.
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    # AdamW is the recipe's optimizer; "SGD" keeps Detectron2's default behaviour.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Scale base learning rates by sqrt(IMS_PER_BATCH / 16), as the authors do for other batch sizes.
    cfg.SOLVER.SQRT_LR_SCALING = True

    # Blocks per stage of "build_narrow_resnet_backbone" (basic blocks; width from RESNETS.RES2_OUT_CHANNELS).
    cfg.MODEL.RESNETS.NARROW_BLOCKS = [1, 1, 1, 1]

    # Swin Transformer backbone (MODEL.BACKBONE.NAME = "build_swin_backbone"); defaults are Swin-T.
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2
    # No absolute position embedding; LayerNorm after the patch embedding.
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    # Stages whose outputs feed the detector (strides 8, 16, 32), each through its own LayerNorm.
    cfg.MODEL.SWIN.OUT_INDICES = [1, 2, 3]
    # 2 freezes the patch embedding and the first stage.
    cfg.MODEL.SWIN.FROZEN_STAGES = 2

    # Images per batch at test time (the authors evaluate two at a time; padding changes the numbers).
    cfg.TEST.IMS_PER_BATCH = 1
    # In evaluation a sparse model (RHO > 0) also reports the DAM recall: the share of the decoder
    # attention map's mass on the tokens the encoder updated, overall and per level. Costs one splat.
    cfg.TEST.DAM_RECALL = True
    # The fast inference path of evaluation (--eval-only and periodic), demo.py and benchmark.py: batch norms
    # folded into the convolutions, channels-last convolutions, no work that only training or analysis
    # uses; the same detections (see sparse_detr/inference.py). False runs the model as it trains.
    cfg.TEST.FAST_INFERENCE = True
    # Precision of the fast path: "float32", "bfloat16" (convolutions and linear layers in bf16; sampling
    # locations, attention softmax, box and class heads and the token scores that top-k ranks stay in
    # float32), "auto": bfloat16 on CPUs with native bf16 (AMX or AVX512-BF16), float32 elsewhere, or "int8".
    cfg.TEST.PRECISION = "auto"
    # "int8" (opt-in, CPU, ResNet backbones; sparse_detr/quantization.py): the backbone's convolutions and most of
    # the transformer's linear layers in int8, the rest as "auto" would run it; its activation ranges are
    # calibrated, when the fast model is built, on this many images of DATASETS.TRAIN[0] (spread over it, resized
    # as for evaluation). The README gives the AP it costs on the demo models.
    cfg.TEST.INT8_CALIBRATION_IMAGES = 8
    # Score from which demo.py (its default --confidence-threshold) and the demo report draw detections;
    # evaluation always takes the top NUM_DETECTIONS. 0.5 as in Detectron2's demo; a config may set the value
    # its model is calibrated to (the demo report prints the F1-best threshold on the validation set).
    cfg.TEST.CONFIDENCE_THRESHOLD = 0.5

    # Training schedule in epochs: with EPOCHS > 0, SOLVER.MAX_ITER and SOLVER.STEPS are derived from the
    # training set's size (EPOCHS x iterations an epoch, learning rate x GAMMA after each LR_DROP_EPOCHS).
    cfg.SOLVER.EPOCHS = 0
    cfg.SOLVER.LR_DROP_EPOCHS = [40]
    # Mixed precision (SOLVER.AMP.ENABLED): "float16" (with a gradient scaler) or "bfloat16".
    cfg.SOLVER.AMP.PRECISION = "float16"
    # Datasets in COCO json to register under a name, so that DATASETS.TRAIN / DATASETS.TEST can use them
    # without Python: a list of [name, json file, image folder] triples (paths relative to the current
    # directory), e.g. [["my_train", "my/train.json", "my/images"], ["my_val", "my/val.json", "my/images"]].
    cfg.DATASETS.COCO_JSON = []
    # The crop branch of the DETR augmentation first resizes the shorter side to one of these.
    cfg.INPUT.CROP_PRE_RESIZE = [400, 500, 600]
    # After the resize of training (its augmentation) and of evaluation and the predictor (MIN/MAX_SIZE_TEST),
    # resize each image to the nearest sides that are multiples of this (0: off); Detectron2's postprocessing
    # scales the boxes back to the image. Every level's map then covers the image exactly (no cell half outside
    # it, whose position the model would have to learn for each size), and on a CPU the convolutions meet a few
    # dozen input shapes whose oneDNN kernels stay in its cache, instead of a new shape, and kernel generation,
    # at nearly every image. The aspect ratio changes by at most half a multiple on a side. The demo sets 32.
    cfg.INPUT.SIDE_MULTIPLE = 0

    # Seconds a process of a distributed run waits for the others at a collective (and at the start for
    # all of them to join) before it stops the run with one line. 0: 300 on CPUs (gloo), Detectron2's 1800
    # with GPUs (NCCL). It must cover the longest a process works alone: a checkpoint save, the COCO
    # evaluation of the main process.
    cfg.DIST_TIMEOUT = 0
