"""The jobs of ``benchmark.py``, one module each; the tool itself holds the command line and the plot.

* :mod:`.timing`: synchronised runs, runs taking turns, the speed of a model at a batch size;
* :mod:`.memory`: the peak memory of a block of runs;
* :mod:`.counts`: trainable parameters and the CPU's peak rate (FLOPs: :mod:`sparse_detr.flops`);
* :mod:`.models`: the models and inputs every job times;
* :mod:`.figures`: every figure of one config (a row of the tables, the ``--json`` object);
* :mod:`.tables`: those rows as markdown;
* :mod:`.scaling`: encoder and total time against the input size;
* :mod:`.ab`: two configurations timed in the same run, turns interleaved, inference or a training iteration;
* :mod:`.ab_processes`: the same for inference, each side in its own process (process settings: the allocator).
"""
from .ab import ab_benchmark, ab_table
from .ab_processes import ab_in_processes
from .figures import benchmark_config
from .models import all_configs
from .scaling import SCALING_ASPECT, SCALING_CONFIGS, scaling_study, scaling_table
from .tables import comparison_table, markdown_table
from .timing import CLOCKS, DTYPES, Timing

__all__ = ["CLOCKS", "DTYPES", "SCALING_ASPECT", "SCALING_CONFIGS", "Timing", "ab_benchmark", "ab_in_processes", "ab_table",
           "all_configs", "benchmark_config", "comparison_table", "markdown_table", "scaling_study", "scaling_table"]
