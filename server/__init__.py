"""FastAPI search service (not built yet)."""
