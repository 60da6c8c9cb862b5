"""Training pieces that make runs resumable bit for bit, and mixed precision on any device.

* :class:`ResumableTrainLoader`: the batch of iteration ``i`` depends only on (seed, i, rank): images come
  from a seeded permutation per epoch and each image's augmentation is seeded by its position in the
  stream, so a run resumed at iteration ``i`` sees exactly the batches of an uninterrupted run.
* :class:`StepSeedHook`: reseeds torch before every iteration (dropout, drop path), for the same reason.
* :class:`UnreadableImagesReport`: after training, how many training images the loader skipped as unreadable.
* :class:`MixedPrecisionTrainer`: ``torch.autocast`` on the model's device (CPU or CUDA) in float16, with a
  gradient scaler, or bfloat16.
* :func:`channels_last_backbone`: the backbone's convolutions channels-last on the CPU (oneDNN's fast layout).
* :func:`gradients_in_parameter_strides`: gradients in the exact strides of DDP's buckets.
* :func:`stop_message`, :class:`TrainingStopped`, :func:`stops_in_one_line`, :func:`exits_in_one_line`: a full
  disk or a lost process ends a run with one line, not a traceback.
"""
import collections
import contextlib
import errno
import functools
import inspect
import itertools
import logging
import random
import re
import time
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .checkpoint import exception_chain
from .output_dir import last_good_checkpoint

__all__ = ["ResumableTrainLoader", "StepSeedHook", "MixedPrecisionTrainer", "UnreadableImagesReport", "stream_seed",
           "channels_last_backbone", "DDP_BUFFERS_NOT_SYNCED", "gradients_in_parameter_strides", "TrainingStopped",
           "stop_message", "stops_in_one_line", "exits_in_one_line"]

logger = logging.getLogger(__name__)

# DDP's option that leaves the buffers (normalisation constants, frozen batch-norm statistics: the same in every
# process) alone in forward; torch 2.14 renames broadcast_buffers, and warns about the old name, to
# forward_sync_buffers.
DDP_BUFFERS_NOT_SYNCED = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})

# key of a mapped dataset dict that lists the images skipped before it (taken out before the model sees it)
SKIPPED_KEY = "_unreadable_images_skipped"


def stream_seed(seed: int, *position: int) -> int:
    """A 32-bit seed for a position in a seeded stream (independent of how the stream is split)."""
    return int(np.random.SeedSequence([seed % 2 ** 32, *position]).generate_state(1)[0])


def channels_last_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """Store the backbone's 4-d weights channels-last when the model is on the CPU; returns the model.

    oneDNN then runs the convolutions in its channels-last layout, forward and backward (their outputs follow
    the weights' layout): 7-14 % less time per iteration for the demo model on one thread. The parameters keep
    their shapes and values, so the state dict, checkpoints and the optimizer see no difference; CUDA models
    are left as they are.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is not None and next(model.parameters()).device.type == "cpu":
        backbone.to(memory_format=torch.channels_last)
    return model


def _in_strides_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if grad.stride() == param.stride() or any(
            g != p for g, p, size in zip(grad.stride(), param.stride(), param.shape) if size != 1):
        return grad
    return grad.as_strided(param.shape, param.stride(), grad.storage_offset())


def gradients_in_parameter_strides(model: torch.nn.Module) -> torch.nn.Module:
    """Make the gradients of parameters with size-1 dimensions (1x1 convolution kernels) come in the parameter's
    strides, without a copy; returns the model.

    DDP reduces gradients through buckets laid out like the parameters, and compares strides exactly, those of
    size-1 dimensions included, although they address no memory. A 1x1 kernel's gradient can take the layout of
    the convolution's input (oneDNN's path, with more than one thread): the input projections of the
    channels-last backbone's maps get channels-last strides, ``(C, 1, C, C)`` for a ``(C, 1, 1, 1)`` parameter,
    the same bytes, and DDP warned "Grad strides do not match bucket view strides". Gradients whose other
    strides differ are left as they are (autograd lays them out like the parameter).
    """
    for param in model.parameters():
        if param.requires_grad and 1 in param.shape:
            param.register_hook(functools.partial(_in_strides_of, param))
    return model


def _identity(batch):
    return batch


class _BatchStream(IterableDataset):
    def __init__(self, loader: "ResumableTrainLoader", start_iter: int):
        self.loader, self.start_iter = loader, start_iter

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        iteration = self.start_iter + worker
        while True:
            yield self.loader.batch(iteration)
            iteration += num_workers


class ResumableTrainLoader:
    """Infinite stream of training batches (lists of mapped dataset dicts) starting at ``start_iter``.

    Sample ``p`` of the global stream (``p = (iteration * world_size + rank) * batch_size + j``) is image
    ``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e`` is a permutation seeded by (seed, e); the
    mapper runs with numpy's and Python's global generators seeded by (seed, p). An image the mapper
    cannot read (it returns None) is replaced by the next one of the permutation; ``unreadable`` counts,
    by file name, how often each was skipped in the batches this process has taken so far.
    """

    def __init__(self, dataset: List[Dict], mapper: Callable[[Dict], Optional[Dict]], *, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if not dataset:
            raise ValueError("the training set is empty")
        self.dataset, self.mapper = dataset, mapper
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.start_iter = 0
        self.unreadable = collections.Counter()
        self._permutation_epoch, self._permutation = None, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._permutation_epoch:
            self._permutation = np.random.default_rng(stream_seed(self.seed, epoch)).permutation(len(self.dataset))
            self._permutation_epoch = epoch
        return int(self._permutation[offset])

    def sample(self, position: int) -> Dict:
        skipped = []
        for attempt in range(len(self.dataset)):
            seed = stream_seed(self.seed, position, attempt)
            np.random.seed(seed)
            random.seed(seed)
            record = self.dataset[self._index(position + attempt)]
            mapped = self.mapper(dict(record))
            if mapped is not None:
                if skipped:  # travels with the batch out of a worker process, to be counted in __iter__
                    mapped[SKIPPED_KEY] = skipped
                return mapped
            skipped.append(record.get("file_name"))
        raise RuntimeError("no image of the training set could be read")

    def batch(self, iteration: int) -> List[Dict]:
        first = (iteration * self.world_size + self.rank) * self.batch_size
        return [self.sample(first + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[List[Dict]]:
        if self.num_workers == 0:
            batches = (self.batch(i) for i in itertools.count(self.start_iter))
        else:  # workers take iterations round-robin, and the DataLoader returns them in that same order
            batches = DataLoader(_BatchStream(self, self.start_iter), batch_size=None, num_workers=self.num_workers,
                                 collate_fn=_identity, persistent_workers=False)
        for batch in batches:
            for mapped in batch:
                self.unreadable.update(mapped.pop(SKIPPED_KEY, ()))
            yield batch


class StepSeedHook(HookBase):
    """Seed torch's generators from (seed, iteration, rank) before every step."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = seed, rank

    def before_step(self):
        torch.manual_seed(stream_seed(self.seed, self.trainer.iter, self.rank))


class UnreadableImagesReport(HookBase):
    """After training, a warning with the number of training images that could not be read and were skipped."""

    def __init__(self, loader: ResumableTrainLoader):
        self.loader = loader

    def after_train(self):
        unreadable = self.loader.unreadable
        if unreadable:
            logger.warning("%d training image(s) could not be read and were skipped (%d skip(s) in all), e.g. %s",
                           len(unreadable), sum(unreadable.values()), ", ".join(sorted(unreadable)[:3]))


class MixedPrecisionTrainer(SimpleTrainer):
    """SimpleTrainer under ``torch.autocast`` on the model's device; float16 uses a gradient scaler."""

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.float16, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(f"mixed precision is float16 or bfloat16, got {precision}")
        self.precision = precision
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if precision == torch.float16 else None

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            get_event_storage().put_scalar("[metric]grad_scale", self.grad_scaler.get_scale(), smoothing_hint=False)

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


# errors of a write that the disk, a quota or a read-only file system refused
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class TrainingStopped(BaseException):
    """Ends a run with the one line ``str(self)`` (:func:`stop_message`).

    A BaseException, like KeyboardInterrupt, so that Detectron2's train loop does not log it as a crash (with
    a traceback, on the console too); its hooks' ``after_train`` still run.
    """


def _is_collective_failure(error: BaseException) -> bool:
    # gloo reports a closed connection or a timeout as a RuntimeError whose text starts with its source file
    return comm.get_world_size() > 1 and (isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "gloo/" in str(error)))


def _checkpoint_note(output_dir: str) -> str:
    checkpoint = last_good_checkpoint(output_dir)
    if checkpoint is None:
        return "no checkpoint has been written yet"
    return f"the last good checkpoint is {checkpoint} (--resume continues from it)"


def stop_message(error: BaseException, output_dir: str) -> Optional[str]:
    """The one line that ends a run stopped by ``error``, when it is not a bug: a write the disk refused (full, a
    quota, read-only), or a process of a distributed run that ended or stopped answering; else None.

    A :class:`TrainingStopped` in the chain of ``error`` (a later failure while the hooks' ``after_train`` ran)
    gives its line. The line ends with the last good checkpoint of ``output_dir``.
    """
    stopped = next((e for e in exception_chain(error) if isinstance(e, TrainingStopped)), None)
    if stopped is not None:
        return str(stopped)
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        what = error.filename or f"into {output_dir}"
        return f"could not write {what}: {error.strerror}; {_checkpoint_note(output_dir)}"
    if _is_collective_failure(error):
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).splitlines()[0].split(". ")[0]
        return (f"process {comm.get_rank()} of {comm.get_world_size()} lost contact with the others ({reason}): one "
                f"of them ended, or did not answer within DIST_TIMEOUT; {_checkpoint_note(output_dir)}")
    return None


@contextlib.contextmanager
def _stopped_as(catch, stopped: Callable[[str], BaseException], output_dir: str):
    """The failures of :func:`stop_message` among ``catch`` re-raised as ``stopped(line)``; others as they are."""
    try:
        yield
    except catch as e:
        message = stop_message(e, output_dir)
        if message is None:
            raise
        raise stopped(message) from e


def stops_in_one_line(output_dir: str):
    """Inside the train loop: the failures of :func:`stop_message` become :class:`TrainingStopped`."""
    return _stopped_as(Exception, TrainingStopped, output_dir)


def exits_in_one_line(output_dir: str):
    """Around a tool's run: the failures of :func:`stop_message` exit with ``error: <line>`` on stderr, status 1."""
    return _stopped_as(BaseException, lambda line: SystemExit(f"error: {line}"), output_dir)
