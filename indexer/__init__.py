"""Gallery indexer: FAISS vectors + SQLite metadata, ingest pipeline (not built yet)."""
