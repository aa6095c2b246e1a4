"""What a run measures and where it goes: hardware facts, metrics.jsonl, the hardware sampler, phase timers and profiles, TensorBoard and W&B."""
