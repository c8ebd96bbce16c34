"""Evaluation, one module per task family."""
