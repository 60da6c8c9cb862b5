#!/usr/bin/env python
"""Train and evaluate Sparse DETR (and the Deformable / Efficient DETR rows) with Detectron2.

    python projects/SparseDETR/train_net.py --config-file projects/SparseDETR/configs/sparse_detr_r50_rho0.1.yaml --num-gpus 8
    python projects/SparseDETR/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python projects/SparseDETR/train_net.py --config-file ... --resume
"""
import functools
import logging
import os
import weakref

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
import torch

from detectron2.data import DatasetCatalog
from detectron2.engine import (DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, default_argument_parser,
                               default_setup, default_writers)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from sparse_detr.allocator import keep_freed_memory
from sparse_detr.checkpoint import SparseDETRCheckpointer
from sparse_detr.cli import (USER_ERRORS, check_weights_file, key_origins, load_config, make_output_dir,
                             report_user_error)
from sparse_detr.dataset_mapper import DetrDatasetMapper
from sparse_detr.datasets import build_test_loader, check_dataset_files, check_num_classes, load_train_dicts
from sparse_detr.engine import (DDP_BUFFERS_NOT_SYNCED, MixedPrecisionTrainer, ResumableTrainLoader, StepSeedHook,
                                UnreadableImagesReport, channels_last_backbone, exits_in_one_line,
                                gradients_in_parameter_strides, stops_in_one_line)
from sparse_detr.evaluation import DAMRecallEvaluator
from sparse_detr.inference import build_inference_model
from sparse_detr.launch import launch_training, share_cpu_threads
from sparse_detr.output_dir import warn_of_changed_schedule
from sparse_detr.solver import SCHEDULE_KEYS, build_optimizer, settle_schedule

logger = logging.getLogger("sparse_detr")


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DETR recipe: its optimizer, augmentation, a resumable loader, COCOEvaluator."""

    def __init__(self, cfg):
        # DefaultTrainer's construction, with DDP that also runs on CPU (gloo), mixed precision in float16 or
        # bfloat16 on any device, and atomic checkpoints. DDP's static graph: no configuration of the project
        # has parameters without gradients (checked for all of them, also on images without boxes), so DDP
        # needs no search for them every step; where a configuration of one's own has some, DDP finds them in
        # the first step. Gradients come in the strides of DDP's buckets.
        TrainerBase.__init__(self)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = next(model.parameters()).is_cuda
        if comm.get_world_size() > 1:
            gradients_in_parameter_strides(model)
        model = create_ddp_model(model, static_graph=True, **DDP_BUFFERS_NOT_SYNCED,
                                 **({} if on_gpu else {"device_ids": None}))
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = MixedPrecisionTrainer(model, data_loader, optimizer,
                                                  precision=getattr(torch, cfg.SOLVER.AMP.PRECISION))
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SparseDETRCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                   reinit_class_heads=cfg.MODEL.SPARSE_DETR.REINIT_CLASS_HEADS)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        self._trainer.data_loader.start_iter = self.start_iter

    # a full disk or a lost process ends the run with one line (sparse_detr.engine.stop_message)
    def run_step(self):
        with stops_in_one_line(self.cfg.OUTPUT_DIR):
            super().run_step()

    def after_step(self):
        with stops_in_one_line(self.cfg.OUTPUT_DIR):
            super().after_step()

    def build_hooks(self):
        return [StepSeedHook(self.cfg.SEED, comm.get_rank()),
                UnreadableImagesReport(self._trainer.data_loader)] + super().build_hooks()

    def build_writers(self):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard event files, "
                           "only the console and metrics.json")
            return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)[:2]
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, its backbone channels-last on the CPU (sparse_detr.engine.channels_last_backbone)."""
        return channels_last_backbone(super().build_model(cfg))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = load_train_dicts(cfg.DATASETS.TRAIN, cfg.MODEL.SPARSE_DETR.NUM_CLASSES,
                                 cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return ResumableTrainLoader(dicts, DetrDatasetMapper(cfg, is_train=True),
                                    batch_size=cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                                    seed=cfg.SEED, rank=comm.get_rank(), world_size=comm.get_world_size(),
                                    num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on the fast inference path (TEST.FAST_INFERENCE, TEST.PRECISION)."""
        return super().test(cfg, build_inference_model(cfg, model), evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        check_num_classes(dataset_name, cfg.MODEL.SPARSE_DETR.NUM_CLASSES)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        coco = COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
        if cfg.MODEL.SPARSE_DETR.RHO > 0 and cfg.TEST.DAM_RECALL:
            return DatasetEvaluators([coco, DAMRecallEvaluator()])
        return coco


def setup(args):
    """The checked config (sparse_detr.cli.load_config) -> the schedule -> freeze -> default_setup."""
    cfg = load_config(args.config_file, args.opts, world_size=comm.get_world_size())
    check_weights_file(cfg.MODEL.WEIGHTS)
    make_output_dir(cfg.OUTPUT_DIR)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sparse_detr")
    share_cpu_threads()
    if args.eval_only and torch.device(cfg.MODEL.DEVICE).type == "cpu":
        # freed activations reused, not mapped afresh for every image. Not for training: it gained nothing there
        # (the demo). (It once surfaced a oneDNN bug, now worked around: sparse_detr/conv_workaround.py.)
        keep_freed_memory()
    for name in (() if args.eval_only else tuple(cfg.DATASETS.TRAIN)) + tuple(cfg.DATASETS.TEST):
        check_dataset_files(name)  # now, rather than at the evaluation after a whole training run
    if not args.eval_only:
        # only an epoch schedule needs the training set's size (loading a large one takes a while)
        size = sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN) if cfg.SOLVER.EPOCHS > 0 else 0
        settle_schedule(cfg, key_origins(args.config_file, args.opts, SCHEDULE_KEYS), size)
    if args.resume and not args.eval_only and comm.is_main_process():
        warn_of_changed_schedule(cfg)  # before default_setup writes this run's config.yaml over the last one's
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    # configuration and data errors (unknown key, missing file, wrong class count) end with one clear line,
    # and so do a full disk and a lost process (sparse_detr.engine.stop_message)
    try:
        cfg = setup(args)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            checkpointer = SparseDETRCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            run = functools.partial(Trainer.test, cfg, model)
        else:
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=args.resume)
            run = trainer.train
    except USER_ERRORS as e:
        raise SystemExit(report_user_error(e))
    with exits_in_one_line(cfg.OUTPUT_DIR):
        return run()


def invoke_main() -> None:
    launch_training(main, default_argument_parser().parse_args())


if __name__ == "__main__":
    invoke_main()
