"""The learned inversion of a folded spectrum: the frozen VAE encoder + regressor, its
preprocessing, augmentation, training, calibrated inference and evaluation.
"""
