"""Where the tests find the repository's files, wherever a test module sits under tests/."""

from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[1]
#: Small input files committed for the tests.
DATA = REPO / "tests" / "data"
#: The committed frozen models.
MODELS = REPO / "models"
