"""Training: the run config and presets, the optimizer, the compiled step, and the loop with its hooks
(logging, evaluation, sampling, checkpoints, tracking, profiling)."""
