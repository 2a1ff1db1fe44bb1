"""The ORCA HTTP service: FastAPI app, settings, database models, storage and routes."""
