"""gptcore: a small character-level GPT, trained and profiled on Slurm clusters."""

__version__ = "0.1.0"
