"""Celery workers: training, embedding, LSH indexing and queries (the only code using torch)."""
