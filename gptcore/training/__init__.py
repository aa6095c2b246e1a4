"""The trainer, which composes the parts below it, and the run directory it owns."""
