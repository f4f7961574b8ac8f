"""The Poisson-likelihood refinement of force constants against the folded counts."""
