"""Evaluation: perplexity and KL divergence, comparisons and benchmarks."""
