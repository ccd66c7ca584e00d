"""The person search service: FastAPI app, schemas, micro-batching, auth and metrics."""

from server.app import create_app
from server.settings import ServerSettings, load_settings

__all__ = ["ServerSettings", "create_app", "load_settings"]
