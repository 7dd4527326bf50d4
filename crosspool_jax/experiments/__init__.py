"""Experiments: serving a fleet from a config, the policy comparisons, results and plots."""
