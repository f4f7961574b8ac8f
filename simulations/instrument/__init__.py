"""The synthetic spectrometer: detector geometry and goniometer orientation, events drawn
from S(Q, E), the reference binning, the counting-noise model and the single-orientation
views planners look at.
"""
