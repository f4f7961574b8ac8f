"""model_server package (see DESIGN.md)."""
