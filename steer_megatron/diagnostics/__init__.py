"""Entropy-change diagnostics: does STEER's Omega predict real per-token entropy changes?"""

from steer_megatron.diagnostics.controller import WMinController, step_entropy_change
from steer_megatron.diagnostics.entropy_change import (
    FORMS, EntropyChangeData, analyze, average_ranks, flat_metrics, omega_forms, pearson,
    plot_binned_scatter, plot_entropy_relation, sign_agreement, spearman,
)
from steer_megatron.diagnostics.hook import DiagnosticsHook
from steer_megatron.diagnostics.measure import EntropyProbe, TrainingSnapshot, measure_entropy_change
from steer_megatron.diagnostics.step_trim import StepTrim, next_trim_scale, search_step_scale

__all__ = [
    "FORMS", "DiagnosticsHook", "EntropyChangeData", "EntropyProbe", "StepTrim", "TrainingSnapshot", "WMinController",
    "analyze", "average_ranks", "flat_metrics", "measure_entropy_change", "next_trim_scale", "omega_forms", "pearson",
    "plot_binned_scatter", "plot_entropy_relation", "search_step_scale", "sign_agreement", "spearman",
    "step_entropy_change",
]
