"""Learned inversion of powder spectra S(|Q|, E) (Su & Li's powder VAE, after the
single-crystal :mod:`model_server.inversion`): the training set of
:mod:`simulations.fcdb.powder_dataset`, a fully connected or a convolutional VAE with a
calibrated regressor, frozen models with ``sample_kind: "powder"``, estimates from folded
powder runs, evaluation."""
