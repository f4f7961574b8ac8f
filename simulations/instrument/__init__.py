"""The synthetic spectrometer: detector geometry and goniometer orientation, events drawn
from S(Q, E), the reference binning and the counting-noise model.
"""
