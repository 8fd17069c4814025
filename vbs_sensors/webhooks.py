"""``webhook_delivery``: the outbox's events sent to ``VBS_WEBHOOK_URLS``, outside every run.

Every few seconds, one round of each event that is due (one try to each receiver that has not
taken it), eight at a time and for at most 20 s a tick; a round that fails is tried again later,
the wait doubling up to ``VBS_WEBHOOK_MAX_BACKOFF_S``, for ``VBS_WEBHOOK_RETRY_HOURS``. A batch
or a job never waits for a receiver: runs leave their events here.
"""

import dagster as dg

from vbs_resources import Catalog, Webhooks
from vbs_resources import layout as L


@dg.sensor(
    name=L.WEBHOOK_SENSOR,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Delivers the outbox's webhook events that are due (retried for hours, with "
    "backoff); never launches runs.",
)
def webhook_delivery(
    context: dg.SensorEvaluationContext, catalog: Catalog, webhooks: Webhooks
) -> dg.SkipReason:
    if not webhooks.urls:
        # Nothing to send to: each event is done as it is recorded; any left from a time
        # with receivers are settled here.
        delivered, failed = webhooks.deliver_due(catalog, budget_seconds=5)
        return dg.SkipReason(f"no webhook URLs; {delivered} event(s) settled")
    delivered, failed = webhooks.deliver_due(catalog)
    if failed:
        context.log.warning(f"{failed} webhook event(s) not taken this round; retried later")
    return dg.SkipReason(f"{delivered} delivered, {failed} to retry" if delivered or failed
                         else "no webhook event due")  # fmt: skip
