"""Simulated runs and their recorded-run files: the facility wire messages and bluesky
documents of a rotation run, the file format they are kept in, the check that a
run shows the dispersion it was made from, and what one orientation sees (slices and cuts
for planners).
"""
