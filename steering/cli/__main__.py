"""``python -m steering.cli``: the ``steer`` command."""

from steering.cli.app import main

if __name__ == "__main__":  # pragma: no cover
    main()
