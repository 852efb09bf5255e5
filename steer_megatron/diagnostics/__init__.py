"""Entropy-change diagnostics: does STEER's Omega predict real per-token entropy changes?"""

from steer_megatron.diagnostics.controller import WMinController, step_entropy_change
from steer_megatron.diagnostics.entropy_change import (
    FORMS, EntropyChangeData, analyze, average_ranks, flat_metrics, omega_forms, pearson,
    plot_binned_scatter, plot_entropy_relation, sign_agreement, spearman,
)
from steer_megatron.diagnostics.hook import DiagnosticsHook
from steer_megatron.diagnostics.measure import EntropyProbe, TrainingSnapshot, measure_entropy_change

__all__ = [
    "FORMS", "DiagnosticsHook", "EntropyChangeData", "EntropyProbe", "TrainingSnapshot", "WMinController", "analyze",
    "average_ranks", "flat_metrics", "measure_entropy_change", "omega_forms", "pearson", "plot_binned_scatter",
    "plot_entropy_relation", "sign_agreement", "spearman", "step_entropy_change",
]
