"""The model: GPT (GPT-2's block and the block options) and the optimizers of its parameters."""
