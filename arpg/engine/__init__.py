"""Loops: training, tokenization, sampling, evaluation, profiling, reporting."""
