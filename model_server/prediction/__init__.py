"""Predictions for planners: expected spectra of any crystal (folded I(q, E), detector
S(Q, E) per angle, powder, indirect geometry), their FC sources and result objects.
"""
