"""Python client for the ORCA model-adaptation service.

>>> from orca_client import Client
>>> with Client() as orca:                      # ORCA_URL / ORCA_API_KEY from the environment
...     dataset = orca.upload_dataset("gunpoint.npz", progress=True)
...     job = orca.create_job(dataset.id, finetune={"epochs": 10}).wait()
...     print(job.model().predict(x_test[:5]).predictions)
"""

from orca_client.client import DEFAULT_URL, Client
from orca_client.errors import AnalysisFailed, ApiError, ConnectionFailed, JobFailed, OrcaError
from orca_client.types import Analysis, Dataset, Event, Job, JobError, Model, Prediction

__all__ = [
    "DEFAULT_URL",
    "Analysis",
    "AnalysisFailed",
    "ApiError",
    "Client",
    "ConnectionFailed",
    "Dataset",
    "Event",
    "Job",
    "JobError",
    "JobFailed",
    "Model",
    "OrcaError",
    "Prediction",
]
