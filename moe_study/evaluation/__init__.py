"""Scoring a trained run: held-out loss and bits per byte, zero-shot tasks, statistics, lm-eval adapter."""
