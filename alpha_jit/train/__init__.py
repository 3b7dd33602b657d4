"""Training infrastructure around the compiled step: data, checkpoints, metrics and plots.

Pure numpy/Python, no GPU: everything here runs (and fails, on bad input) before the first
kernel is compiled. `plot` imports matplotlib only when a curve is drawn.
"""

from alpha_jit.train.checkpoint import (
    CheckpointError,
    ConfigMismatchError,
    NonFiniteError,
    check_compatible,
    config_differences,
    load_checkpoint,
    save_checkpoint,
    strip_prefix,
    with_prefix,
)
from alpha_jit.train.data import (
    SEPARATOR,
    VOCAB_SIZE,
    BatchLoader,
    Corpus,
    DataError,
    Dataset,
    load_dataset,
    load_tokens,
    resolve_corpus,
    split_tokens,
    unigram_entropy,
)
from alpha_jit.train.metrics import MetricsError, MetricsLog, Throughput, read_metrics, tokens_per_s
from alpha_jit.train.plot import plot_loss_curve

__all__ = [
    "SEPARATOR",
    "VOCAB_SIZE",
    "BatchLoader",
    "CheckpointError",
    "ConfigMismatchError",
    "Corpus",
    "DataError",
    "Dataset",
    "MetricsError",
    "NonFiniteError",
    "MetricsLog",
    "Throughput",
    "check_compatible",
    "config_differences",
    "load_checkpoint",
    "load_dataset",
    "load_tokens",
    "plot_loss_curve",
    "read_metrics",
    "resolve_corpus",
    "save_checkpoint",
    "split_tokens",
    "strip_prefix",
    "tokens_per_s",
    "unigram_entropy",
    "with_prefix",
]
