"""Silences, once at ``import sparse_detr``, the warnings of the libraries below that are known to be harmless here.

* fvcore and Detectron2 script a few helpers with ``torch.jit.script`` when they are imported, which this
  PyTorch deprecates (a FutureWarning each). Only those imports are silenced: a ``torch.jit.script`` of
  your own still warns.
* Detectron2's Swin-T imports DropPath from ``timm.models.layers`` when it builds the backbone, which timm
  deprecates for ``timm.layers`` (a FutureWarning with that message alone).
* ``torch.utils.cpp_extension`` logs "No CUDA runtime is found" on a machine with a CUDA toolkit but no GPU;
  this project compiles nothing.
* Detectron2's environment table (logged by ``default_setup``) says ``detectron2._C`` is "not built
  correctly" when it is simply not installed; this project uses none of Detectron2's compiled ops, so the
  line says that instead.

An entry point must import ``sparse_detr`` before Detectron2 for the first item to take effect.
"""
import logging
import re
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import fvcore.nn  # noqa: F401
    import detectron2.modeling  # noqa: F401
warnings.filterwarnings("ignore", message=r"Importing from timm\.models\.layers is deprecated", category=FutureWarning)

__all__ = []

MISSING_COMPILED_OPS = re.compile(r"not built correctly: No module named 'detectron2\._C'")


class _DropNoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


class _ExplainMissingCompiledOps(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "detectron2._C" in record.msg:
            record.msg = MISSING_COMPILED_OPS.sub("not installed (not needed: this project uses no compiled op of "
                                                  "Detectron2)", record.msg)
        return True


logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaRuntime())
logging.getLogger("detectron2").addFilter(_ExplainMissingCompiledOps())
