"""consumers package (see DESIGN.md)."""
