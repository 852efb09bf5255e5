"""Entropy-change diagnostics: does STEER's Omega predict real per-token entropy changes?
(What changes training on their measurements, the closed loop and the step trim, lives on the
algorithm side: steer_megatron.algorithms.controller / step_trim.)"""

from steer_megatron.diagnostics.entropy_change import (
    FORMS, EntropyChangeData, analyze, average_ranks, flat_metrics, omega_forms, pearson,
    plot_binned_scatter, plot_entropy_relation, sign_agreement, spearman,
)
from steer_megatron.diagnostics.hook import DiagnosticsHook
from steer_megatron.diagnostics.measure import EntropyProbe, TrainingSnapshot, measure_entropy_change

__all__ = [
    "FORMS", "DiagnosticsHook", "EntropyChangeData", "EntropyProbe", "TrainingSnapshot",
    "analyze", "average_ranks", "flat_metrics", "measure_entropy_change", "omega_forms", "pearson",
    "plot_binned_scatter", "plot_entropy_relation", "sign_agreement", "spearman",
]
