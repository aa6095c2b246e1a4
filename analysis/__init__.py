"""Scaling analysis of gptcore runs: `python -m analysis.report RUN_DIR... --out DIR`."""
