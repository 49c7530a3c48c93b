"""Runnable workloads: `python -m experiments.NAME`; each module docstring says what it shows."""
