"""Tuning an experiment with optuna: the search space, the shared study, trials and results."""
