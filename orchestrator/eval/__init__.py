"""Evaluating a checkpoint with lm-eval-harness."""
