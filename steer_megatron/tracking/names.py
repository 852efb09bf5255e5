"""Metric names shared by the trainer (writer) and tools/plot_run.py (reader)."""

ENTROPY = "actor/entropy"
ACCURACY = "train/accuracy"
REWARD = "train/reward_mean"
RESPONSE_LENGTH = "rollout/response_length_mean"

# (panel title, metric key) drawn by tools/plot_run.py when no --metric is given
DEFAULT_PANELS = (
    ("entropy", ENTROPY),
    ("accuracy", ACCURACY),
    ("response length", RESPONSE_LENGTH),
    ("reward", REWARD),
)
