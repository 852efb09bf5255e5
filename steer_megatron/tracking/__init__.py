"""Run tracking: metrics to JSONL / TensorBoard / wandb, console progress and summaries.

(Named `tracking`, not `logging`, so it never shadows the standard library module.)
"""
from steer_megatron.tracking.console import make_progress, print_step_summary, step_summary
from steer_megatron.tracking.metrics_logger import JSONL_NAME, MetricsLogger, read_metrics

__all__ = ["JSONL_NAME", "MetricsLogger", "make_progress", "print_step_summary", "read_metrics", "step_summary"]
