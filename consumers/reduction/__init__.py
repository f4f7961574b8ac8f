"""The transport-neutral reduction core: the fold table and kernels, the coverage and its
cache, accumulation, segmentation of the run into orientations, the run's set-up from its
pl72 ``nexus_structure``, and the pipeline that turns messages into snapshots. Imports no
transport (Kafka, 0MQ).
"""
