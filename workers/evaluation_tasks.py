"""Thin task for ``POST /jobs/evaluate``: score the active model on labelled query images."""

from __future__ import annotations

from shared.jobs import EVALUATE_TASK
from shared.schema import EvaluateParams
from workers.celery_app import app, settings
from workers.context import get_context
from workers.tasks import ThrottledProgress, _run


@app.task(name=EVALUATE_TASK, soft_time_limit=settings.train_time_limit_s,
          time_limit=settings.train_time_limit_s + 120)
def evaluate(job_id: str, params: dict) -> dict:
    """Precision/mAP at k, exact and through LSH, against baselines (``workers.evaluation``)."""
    ctx = get_context(settings)

    def work(attempt: int):
        from workers.evaluation import run_evaluation

        report = ThrottledProgress(ctx, job_id, attempt=attempt)
        result = run_evaluation(settings, ctx.redis, ctx.models, EvaluateParams.parse(params),
                                ctx.device, report, threads=max(2, ctx.threads))
        return result, {**report.state, "phase": "done"}

    return _run(ctx, job_id, work)
