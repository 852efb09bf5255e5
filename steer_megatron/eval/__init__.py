"""Evaluation metrics on benchmark parquets."""
from steer_megatron.eval.metrics import EvalSample, benchmark_metrics, flatten_metrics, pass_at_k

__all__ = ["EvalSample", "benchmark_metrics", "flatten_metrics", "pass_at_k"]
