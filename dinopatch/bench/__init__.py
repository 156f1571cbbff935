"""Throughput benchmarks: ``python -m dinopatch.bench [stages...] --quick --repeats N --json FILE``.

Stages are registered functions (:mod:`.registry`) that return rows; the
kernel stages (:mod:`.stages.kernels`) time the distance and coreset kernels
beside their peers (:mod:`.peers`), the pipeline stages time alignment,
post-processing, end-to-end predict and streaming, the backbone stage the
engines, and the ``cuda`` stage is the GPU check that
``benchmarks/gpu_check.sh`` runs.  :mod:`.report` prints the table and writes
the JSON described in docs/benchmarks.md.

In the kernel stages, ``rel_err`` is the largest deviation from the exact
result relative to the largest distance, ``exact_match`` the largest distance
returned for queries equal to a bank row (0 is right), and GFLOP/s counts two
flops per query-row-feature triple for every method (the GEMM count), so
direct-difference and GEMM-style peers compare on the same work.
"""

# Importing the package sets OMP_WAIT_POLICY=PASSIVE (see dinopatch.kernels).
from . import stages  # noqa: F401  (registers every stage)
from .cli import main
from .registry import GROUPS, STAGES, stage

__all__ = ["GROUPS", "STAGES", "main", "stage"]
