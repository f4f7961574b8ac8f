"""The HTTP API: the FastAPI application, its routers and schemas."""
