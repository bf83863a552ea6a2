"""Celery workers: training, embedding, LSH indexing and query jobs (the only code that imports torch)."""
