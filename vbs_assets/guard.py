"""How the batch assets end when something goes wrong, the same way in each.

- The run cannot proceed (``RunRefused``: the batch is unknown, not validated yet, or held by
  another run): the run fails, tagged ``vbs/refused``, and the batch is left exactly as it was;
  the reconciler sensor starts a whole ``batch_job`` run for it if it still needs one.
- The engine is unavailable for now (``EngineUnavailable``: its server is down): the batch is
  left as it is and the step is retried within the run after a wait, resuming from the last
  checkpoint; once those retries are spent the run fails, and the reconciler fails the batch with
  the results it finished.
- Anything else unexpected: the batch ends ``failed`` with an error entry that names the run
  (never the exception's text, which may hold paths, URLs or credentials), then the run fails
  without a retry. A process that dies never reaches this code: the daemon retries its run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import dagster as dg

from vbs_assets.runner import RunRefused
from vbs_resources import layout as L
from vbs_resources.engine import EngineUnavailable
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.wire import BatchErrorEntry


@contextlib.contextmanager
def batch_step(
    context: dg.AssetExecutionContext,
    lifecycle: BatchLifecycle,
    code: str,
    fail_keeping_results: Callable[[list[BatchErrorEntry]], bool] | None = None,
) -> Iterator[None]:
    """``fail_keeping_results`` ends the batch ``failed`` with what it finished (the runner's
    checkpoint merged into its files); without it, or if it fails too, the batch just fails."""
    batch_id = context.partition_key
    try:
        yield
    except dg.Failure:
        raise  # already decided by the step (a batch that failed validation)
    except EngineUnavailable as away:
        context.log.warning(f"{batch_id}: {away}; retrying in {away.wait_s:.0f}s")
        context.instance.add_run_tags(context.run_id, {L.TAG_ENGINE_UNAVAILABLE: str(away)[:200]})
        raise dg.RetryRequested(max_retries=away.retries, seconds_to_wait=away.wait_s) from None
    except RunRefused as refused:
        context.instance.add_run_tags(context.run_id, {L.TAG_REFUSED: str(refused)[:200]})
        raise dg.Failure(
            description=f"This run cannot proceed and left {batch_id} unchanged: {refused}",
            allow_retries=False,
        ) from None
    except Exception:
        context.log.exception(f"{batch_id}: unexpected error")
        errors = [
            BatchErrorEntry(
                code=code,
                message=f"The batch stopped on an internal error; Dagster run "
                f"{context.run_id} has the details.",
            )
        ]
        ended = False
        if fail_keeping_results is not None:
            try:
                ended = fail_keeping_results(errors)
            except Exception:  # noqa: BLE001 - the plain failure below still ends the batch
                context.log.exception(f"{batch_id}: could not keep the finished results")
        if not ended:
            lifecycle.fail(batch_id, errors)
        raise
