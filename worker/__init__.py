"""Celery workers: thin tasks that load a job by id, run ``orca_engine.pipeline`` and record progress.

The API never imports this package; it enqueues ``orca.run_job`` by name (see ``api.queue``).
"""
