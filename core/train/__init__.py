"""Training: the objective, the loop and what it reports."""
