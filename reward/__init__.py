"""Reward models and reward functions (the embedded task's ground-truth scorer, rules, remote scorers)."""
