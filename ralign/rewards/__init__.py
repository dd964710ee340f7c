"""Reward programs: a fixed table of pure builtins and an evaluator over the plan's expression IR."""
