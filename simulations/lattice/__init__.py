"""The physics core: crystals, symmetry-reduced force constants, q-paths and grids,
the fast forward model I(q, E), the full coherent S(Q, E), pair-block phonons and the
instrument's energy resolution. Imports nothing of the instrument, runs or FC database.
"""
