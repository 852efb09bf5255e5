"""The GRPO/STEER training loop and its Megatron-side pieces."""
