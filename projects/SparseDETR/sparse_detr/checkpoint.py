"""Converting the authors' checkpoints and backbone initialisations, and loading with a class-count check.

Accepted inputs of :func:`convert_checkpoint`:

* an authors' Deformable / Efficient / Sparse DETR checkpoint (``{"model": state_dict}``, R50 or Swin-T):
  its class heads are kept as they are (the COCO models' 91 columns, one per category id 0 .. 90, are part
  of the model: see ``MODEL.SPARSE_DETR.CLASS_COLUMNS``); ``contiguous_classes=True`` keeps only the rows
  of the 80 used COCO ids, in Detectron2's contiguous order, for contiguous class heads;
* a torchvision ResNet-50 state dict (``conv1.weight``, ``layer1.0...``), for MODEL.WEIGHTS;
* the ImageNet Swin-T checkpoint (``{"model": {"patch_embed...", "layers...."}}``), for MODEL.WEIGHTS;
* an SCRL checkpoint (``online_network_state_dict`` with ``encoder.{0,1,4,5,6,7}``), for MODEL.WEIGHTS.
"""
import glob
import logging
import os
import re
import secrets
from typing import Callable, Dict, IO

import torch
from torch import Tensor

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

__all__ = ["convert_checkpoint", "convert_state_dict", "exception_chain", "remove_stale_temporaries",
           "save_checkpoint_atomically", "SparseDETRCheckpointer"]

logger = logging.getLogger(__name__)

COCO_THING_IDS = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]  # Detectron2's contiguous order
COCO_ID_COLUMNS = max(COCO_THING_IDS) + 1  # the authors' heads: a column per COCO id 0 .. 90
SCRL_ENCODER_TO_TORCHVISION = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
EXPECTED_INPUTS = ("an authors' Deformable/Efficient/Sparse DETR checkpoint ({'model': ...} with 'transformer.*' keys), "
                   "a torchvision ResNet-50 state dict ('conv1.weight', 'layer1.*'), the ImageNet Swin-T checkpoint "
                   "('patch_embed.*', 'layers.*'), or an SCRL checkpoint ('online_network_state_dict')")
TEMPORARY_PREFIX = ".tmp-"  # of the files written before their rename into place


def torchvision_resnet_to_detectron2(name: str) -> str:
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight`` and so on."""
    name = re.sub(r"^conv1\.", "stem.conv1.", name)
    name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
    name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
    name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
    return name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")


def _backbone_key(name: str, swin: bool) -> str:
    return "backbone." + (name if swin else torchvision_resnet_to_detectron2(name))


def _is_swin(names) -> bool:
    return any(n.startswith("patch_embed.") for n in names)


def _convert_detector(sd: Dict[str, Tensor], contiguous_classes: bool) -> Dict[str, Tensor]:
    body = {k[len("backbone.0.body."):]: v for k, v in sd.items() if k.startswith("backbone.0.body.")}
    swin = _is_swin(body)
    out = {_backbone_key(k, swin): v for k, v in body.items() if not k.endswith("num_batches_tracked")}
    separate_heads = any(k.startswith(("transformer.decoder.bbox_embed.", "transformer.encoder.class_embed."))
                         for k in sd)
    for key, value in sd.items():
        if key.startswith("backbone."):
            continue
        if key.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.",
                           "transformer.encoder.class_embed.", "transformer.encoder.bbox_embed.")):
            continue  # aliases of the top-level heads
        head = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
        if head:
            if not separate_heads and head.group(2) != "0":
                continue  # one head shared by every decoder layer
            if head.group(1) == "class_embed" and contiguous_classes:
                if value.shape[0] != COCO_ID_COLUMNS:
                    raise ValueError(f"contiguous_classes picks the 80 COCO rows of a {COCO_ID_COLUMNS}-row class "
                                     f"head, but {key} has {value.shape[0]} rows")
                value = value[COCO_THING_IDS]
            out[f"transformer.{key}"] = value
        elif key == "query_embed.weight":
            out["transformer.query_embed.weight"] = value
        else:
            out[key] = value
    return out


def _is_project_layout(sd: Dict) -> bool:
    """A detector in this project's names: 'transformer.*' without the authors' 'backbone.0.*' and 'class_embed.*'."""
    return any(k.startswith("transformer.") for k in sd) and not any(
        k.startswith(("backbone.0.", "class_embed.")) for k in sd)


def convert_state_dict(checkpoint: Dict, contiguous_classes: bool = False) -> Dict[str, Tensor]:
    """Any accepted input (see the module docstring) -> a state dict in this project's names.

    ``contiguous_classes``: reduce the authors' 91-row COCO class heads to the 80 used ids (contiguous order).
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict, got {type(checkpoint).__name__}; expected {EXPECTED_INPUTS}")
    if "online_network_state_dict" in checkpoint:
        encoder = {k: v for k, v in checkpoint["online_network_state_dict"].items() if k.startswith("encoder.")}
        renamed = {}
        for key, value in encoder.items():
            _, index, rest = key.split(".", 2)
            if index in SCRL_ENCODER_TO_TORCHVISION and not rest.endswith("num_batches_tracked"):
                renamed[f"{SCRL_ENCODER_TO_TORCHVISION[index]}.{rest}"] = value
        if "conv1.weight" not in renamed:
            raise ValueError("the SCRL checkpoint has no 'encoder.0.weight' (conv1) in online_network_state_dict")
        return {_backbone_key(k, False): v for k, v in renamed.items()}
    sd = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    sd = {k: v for k, v in sd.items() if not k.endswith(("total_ops", "total_params"))}
    if _is_project_layout(sd):
        raise ValueError("this checkpoint is already in this project's layout ('transformer.class_embed.*', "
                         "backbone in Detectron2's names): it needs no conversion, use it as MODEL.WEIGHTS directly")
    if any(k.startswith("transformer.") for k in sd):
        stray = [k for k in sd if k.startswith("backbone.") and not k.startswith("backbone.0.body.")]
        if stray:  # the authors' backbone is all under backbone.0.body: these would be dropped
            raise ValueError(f"{len(stray)} backbone tensors are outside the authors' 'backbone.0.body.*' (first: "
                             f"{stray[0]!r}); converting would lose them. Expected {EXPECTED_INPUTS}")
        return _convert_detector(sd, contiguous_classes)
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return {_backbone_key(k, False): v for k, v in sd.items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    if _is_swin(sd):
        return {_backbone_key(k, True): v for k, v in sd.items()
                if not k.startswith(("head.", "norm.")) and not k.endswith("attn_mask")}
    raise ValueError(f"unrecognised checkpoint (first keys: {list(sd)[:5]}); expected {EXPECTED_INPUTS}")


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into a temporary file of the same folder, then rename: a crash never leaves a half-written
    ``path``. The file is created like any other (mode 0666 less the umask), not 0600 like mkstemp's.

    A write the file system refuses is an OSError naming ``path`` (torch.save reports a full disk as a
    RuntimeError "unexpected pos", with the OSError only in its context)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TEMPORARY_PREFIX}{secrets.token_hex(6)}-{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        refused = next((c for c in exception_chain(e) if isinstance(c, OSError) and c.errno), None)
        if refused is None:
            raise
        raise OSError(refused.errno, refused.strerror, path) from e


def exception_chain(error: BaseException):
    """``error``, then the exception it was raised while handling, and so on."""
    while error is not None:
        yield error
        error = error.__context__


def save_checkpoint_atomically(obj, path: str) -> None:
    """torch.save through :func:`write_atomically`."""
    write_atomically(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str) -> None:
    """Delete the temporary files that a process killed while writing left in ``folder``."""
    stale = glob.glob(os.path.join(glob.escape(folder), TEMPORARY_PREFIX + "*"))
    for path in stale:
        os.remove(path)
    if stale:
        logger.warning("removed %d unfinished checkpoint file(s) of an interrupted save from %s", len(stale), folder)


def convert_checkpoint(src: str, dst: str, contiguous_classes: bool = False) -> Dict[str, Tensor]:
    """Convert the file ``src`` (see the module docstring) into a Detectron2 checkpoint at ``dst``."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no checkpoint at {src}")
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors: whatever it is, it is not a checkpoint
        raise ValueError(f"{src} is not a PyTorch checkpoint ({type(e).__name__}: {e}); expected {EXPECTED_INPUTS}")
    sd = convert_state_dict(checkpoint, contiguous_classes)
    save_checkpoint_atomically({"model": sd, "__author__": "sparse_detr.convert_checkpoint"}, dst)
    logger.info("converted %s -> %s: %d tensors of the file's %d (the others are batch-norm counters, aliases of "
                "shared heads, or parts of the file that are not the detector's)", src, dst, len(sd),
                _count_tensors(checkpoint))
    return sd


def _count_tensors(obj) -> int:
    if isinstance(obj, Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


class SparseDETRCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that also reads the authors' checkpoints and checks the class count.

    Class heads are loaded as they are when the checkpoint and the model agree on their size. A checkpoint
    with a row per category id (the authors' 91-row COCO models) loaded into contiguous class heads keeps the
    rows of the dataset's ids (``model.dataset_class_ids``), in contiguous order. Any other mismatch raises a
    ValueError naming both layouts, unless ``reinit_class_heads=True`` (fine-tuning on a new dataset), in
    which case the class heads keep their fresh initialisation.
    """

    def __init__(self, model, save_dir: str = "", *, reinit_class_heads: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.reinit_class_heads = reinit_class_heads

    def _torch_load(self, f):
        try:
            loaded = super()._torch_load(f)
        except Exception as e:  # pickle, zip and EOF errors: a text file, a truncated download
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{f} is not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{f} holds a {type(loaded).__name__}, not a checkpoint (a dict of tensors)")
        return loaded

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        sd = loaded.get("model", {})
        if any(k.startswith("backbone.0.body.") for k in sd) or any(k.startswith("transformer.decoder.class_embed")
                                                                  for k in sd):
            self.logger.info("%s is in the authors' layout: converting it on the fly", filename)
            loaded["model"] = convert_state_dict({"model": sd})
            loaded["matching_heuristics"] = False
        return loaded

    def _load_model(self, checkpoint):
        sd = checkpoint["model"]
        own = self.model.state_dict()
        class_columns = getattr(self.model, "class_columns", None)
        ids = getattr(self.model, "dataset_class_ids", None)
        picked = []
        for key in [k for k in sd if k.startswith("transformer.class_embed.") and k in own]:
            have, want = sd[key].shape[0], own[key].shape[0]
            if have == want:
                continue
            if class_columns is None and ids is not None and want == len(ids) and have == max(ids) + 1:
                sd[key] = sd[key][ids]  # category-id rows -> the contiguous classes' rows
                picked.append(key)
            elif self.reinit_class_heads:
                del sd[key]
            else:
                raise ValueError(self._class_layout_error(key, have, want, class_columns is not None, ids))
        if picked:
            self.logger.info("the checkpoint's class heads have a row per category id (%d), the model's are "
                             "contiguous (%d): took the rows of the dataset's category ids", max(ids) + 1, len(ids))
        return super()._load_model(checkpoint)

    @staticmethod
    def _class_layout_error(key: str, have: int, want: int, model_by_ids: bool, ids) -> str:
        if ids is not None and have == max(ids) + 1:
            theirs = f"{have} rows, one per category id 0 .. {have - 1}"
        elif ids is not None and have == len(ids):
            theirs = f"{have} rows, one per contiguous class"
        else:
            theirs = f"{have} rows"
        if model_by_ids:
            ours = f"{want} columns, one per category id (MODEL.SPARSE_DETR.CLASS_COLUMNS 'dataset_ids')"
        else:
            ours = f"{want} columns, one per contiguous class (MODEL.SPARSE_DETR.NUM_CLASSES)"
        if model_by_ids and ids is not None and have == len(ids):
            hint = "set MODEL.SPARSE_DETR.CLASS_COLUMNS contiguous to load it"
        else:
            hint = (f"set MODEL.SPARSE_DETR.NUM_CLASSES (and CLASS_COLUMNS) to the checkpoint's classes, or "
                    f"MODEL.SPARSE_DETR.REINIT_CLASS_HEADS True to fine-tune fresh class heads")
        return f"the checkpoint's class heads have {theirs} ({key}), but the model's have {ours}: {hint}"

    def save(self, name: str, **kwargs) -> None:
        """Like DetectionCheckpointer.save, but written atomically (temporary file, then rename)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        remove_stale_temporaries(self.save_dir)
        save_checkpoint_atomically(data, path)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Like Checkpointer.tag_last_checkpoint, but written atomically: a kill never leaves it empty."""
        write_atomically(os.path.join(self.save_dir, "last_checkpoint"),
                         lambda f: f.write(last_filename_basename.encode()))
