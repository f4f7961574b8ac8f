"""steering package (see DESIGN.md)."""
