"""Dataset transferability analyses: validate a request, record it, enqueue it, read the latest.

The analysis itself runs on a worker (``orca.analyze_dataset``, torch is never imported here).
Broker failure policy as for jobs: the row is committed before the task is sent, and deleted
again with a 503 ``broker_unavailable`` when the broker refuses the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.config import Settings
from api.errors import ApiError
from api.models import Dataset, DatasetAnalysis
from api.queue import BrokerUnavailable, JobQueue
from api.schemas import AnalysisCreate
from api.services.datasets import get_dataset
from api.services.jobs import DATASET_ID_PREFIX, check_backbone_path

logger = logging.getLogger(__name__)

#: source proxies the engine knows by name (orca_engine.proxies); others must be dataset ids
NAMED_PROXIES = ("english-text", "natural-images")


def _check_sources(*, db_session: Session, tenant_id: str, sources: list[str]) -> None:
    for index, source in enumerate(sources):
        if source in NAMED_PROXIES:
            continue
        if source.startswith(DATASET_ID_PREFIX):
            try:
                get_dataset(db_session=db_session, tenant_id=tenant_id, dataset_id=source)
            except ApiError as exc:
                exc.param = f"sources.{index}"
                raise
            continue
        raise ApiError(
            422,
            "invalid_source",
            f"unknown source {source!r}: name a proxy ({', '.join(NAMED_PROXIES)}) or one of "
            "your dataset ids (ds_...)",
            param=f"sources.{index}",
        )


def create_analysis(
    *,
    db_session: Session,
    settings: Settings,
    queue: JobQueue,
    tenant_id: str,
    dataset_id: str,
    parse_request: Callable[[], AnalysisCreate],
) -> DatasetAnalysis:
    """Validate, record (status ``queued``) and enqueue an analysis of the tenant's dataset.

    ``parse_request`` validates the body; it is called only once the dataset is found, so an
    unknown or foreign dataset id answers 404 whatever the body holds (as every route does).
    """
    dataset = get_dataset(db_session=db_session, tenant_id=tenant_id, dataset_id=dataset_id)
    request = parse_request()
    for index, backbone in enumerate(request.backbones or []):
        try:
            check_backbone_path(backbone, settings.model_dirs)
        except ApiError as exc:
            exc.param = f"backbones.{index}"
            raise
    _check_sources(db_session=db_session, tenant_id=tenant_id, sources=request.sources or [])
    queue_name = queue.pick_queue(request.queue)
    analysis = DatasetAnalysis(
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        status="queued",
        queue=queue_name,
        params=request.model_dump(mode="json"),
    )
    db_session.add(analysis)
    db_session.commit()
    try:
        queue.enqueue_analysis(analysis.id, queue_name)
    except BrokerUnavailable:
        db_session.delete(analysis)
        db_session.commit()
        raise ApiError(
            503,
            "broker_unavailable",
            "the job queue is unreachable; no analysis was started, retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    logger.info("analysis %s of dataset %s queued on %s", analysis.id, dataset.id, queue_name)
    return analysis


def latest_analysis(
    *, db_session: Session, tenant_id: str, dataset_id: str, succeeded_only: bool = False
) -> DatasetAnalysis | None:
    """The newest analysis of a dataset (optionally the newest succeeded one), or None."""
    query = select(DatasetAnalysis).where(
        DatasetAnalysis.dataset_id == dataset_id, DatasetAnalysis.tenant_id == tenant_id
    )
    if succeeded_only:
        query = query.where(DatasetAnalysis.status == "succeeded")
    return db_session.scalar(query.order_by(DatasetAnalysis.id.desc()).limit(1))


def get_latest_analysis(*, db_session: Session, tenant_id: str, dataset_id: str) -> DatasetAnalysis:
    """The newest analysis of the tenant's dataset; 404 for an unknown/foreign dataset or none yet."""
    dataset: Dataset = get_dataset(
        db_session=db_session, tenant_id=tenant_id, dataset_id=dataset_id
    )
    analysis = latest_analysis(db_session=db_session, tenant_id=tenant_id, dataset_id=dataset.id)
    if analysis is None:
        raise ApiError(
            404,
            "analysis_not_found",
            f"dataset {dataset_id} has not been analysed yet; POST /v1/datasets/{dataset_id}/analyze",
            param="dataset_id",
        )
    return analysis
