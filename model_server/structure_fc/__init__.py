"""The equivariant structure-to-force-constant model (e3nn): the crystal graph, the
network, the frozen model, its training data and settings, training and evaluation.
"""
