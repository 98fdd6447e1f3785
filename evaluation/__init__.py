"""Sample-quality evaluation: FID, Inception Score, precision/recall, density/coverage (docs/EVAL.md).

Layers, bottom up (each imports only those above it):
  metrics     the numbers, on feature arrays (numpy + scipy)
  features    FeatureExtractor (the network's interface), EvalError, .npz cache files, statistics files
  sources     image folders and .npz image batches as uint8 batches
  references  what samples are compared with (images or stored statistics) -> Reference
  shards      resumable sample shards, keyed on the weights' hash and every setting that changes a sample
  report      `evaluate` / `evaluate_folder`: score, write OUT/metrics.json, print the table
  sampler     evaluation samples from a pipeline of either backend (`run.py eval`)
  inception   the FID Inception-v3 in torch: the only module here that imports a framework (import it by name)

`import evaluation` imports neither torch nor jax.
"""

from evaluation.features import EvalError, FeatureExtractor, save_stats
from evaluation.references import Reference, load_reference
from evaluation.report import PRDC_NAMES, RANDOM_INIT_WARNING, compute_metrics, evaluate, evaluate_folder
from evaluation.sampler import evaluate_pipeline

__all__ = ["EvalError", "FeatureExtractor", "PRDC_NAMES", "RANDOM_INIT_WARNING", "Reference", "compute_metrics",
           "evaluate", "evaluate_folder", "evaluate_pipeline", "load_reference", "save_stats"]
