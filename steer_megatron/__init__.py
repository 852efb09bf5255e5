"""steer-megatron: STEER entropy-steered RLVR on Megatron-Core."""

__version__ = "0.1.0"
