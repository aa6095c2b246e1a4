"""Launching gptcore runs: submit.py (submitit, Slurm or local), monitor.py (the live job table)."""
