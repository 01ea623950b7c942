"""The RL baseline: GRPO on the same student and prompts, metered by the same GpuLedger."""
