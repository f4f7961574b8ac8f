"""Where force constants come from: the ML-force-field reference ensembles and named FC
sets of each material, training sets drawn from their domain, and the FC database of
many crystals (its build pipeline and catalogue).
"""
