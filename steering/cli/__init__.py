"""The ``steer`` command line: one module per command group."""
