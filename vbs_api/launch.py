"""Starts a batch's run through the Dagster webserver's GraphQL API.

A file dropped into the inbox waits for the sensor daemon, which evaluates sensors at most every
five seconds. A batch created through the API needs no such wait: the API adds the batch's
partition and launches ``batch_job`` for it directly, with the run config and tags the sensor
would have used, so the run is the same one either way (same job, partition, assets and checks).
If the webserver cannot be reached the batch is not lost: the reconciler sensor gives every
batch without a run one.

Messages of the exceptions below are safe to show a client: they never hold the webserver's URL
(which may carry credentials); the log has the details.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import httpx

from vbs_resources import layout as L
from vbs_resources.settings import redact_url

log = logging.getLogger("vbs.api")


class RunState(NamedTuple):
    """What Dagster says of a run: its status, its tags and when it ended (epoch seconds)."""

    status: str
    tags: dict[str, str]
    end_time: float | None


ADD_PARTITION = """
mutation VbsAddBatchPartition($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename
    ... on Error { message }
  }
}
"""

RUN_STATUS = """
query VbsRunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status endTime tags { key value } }
    ... on Error { message }
  }
}
"""

LAUNCH_RUN = """
mutation VbsLaunchBatchRun($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""


LOCATION_STATUS = """
query VbsLocationStatus {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""

RELOAD_LOCATION = """
mutation VbsReloadLocation($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) { __typename }
}
"""

TERMINATE_RUN = """
mutation VbsTerminateRun($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on Error { message }
  }
}
"""


class LaunchUnavailable(Exception):
    """Nothing was launched, for a reason that may pass (unreachable, 5xx, a code location still
    loading): the batch is left to the reconciler, which starts it from inside Dagster."""


class LaunchFailed(Exception):
    """The webserver refused the launch for good (a 4xx, an invalid run config)."""


# Answers that say the run itself is wrong, and would be wrong again.
DEFINITIVE = {
    "RunConfigValidationInvalid",
    "InvalidSubsetError",
    "InvalidStepError",
    "InvalidOutputError",
    "ConflictingExecutionParamsError",
    "PresetNotFoundError",
}
# (Dagster answers UnauthorizedError for a code location it has not loaded, too: not final.)


class BatchLauncher:
    """Launches ``batch_job`` runs through ``{url}/graphql`` (``vbs serve`` passes its own
    webserver's URL as ``VBS_DAGSTER_URL``)."""

    def __init__(
        self,
        url: str,
        location: str = L.CODE_LOCATION,
        repository: str = L.REPOSITORY,
        timeout: float = 30.0,
    ) -> None:
        self.endpoint = url.rstrip("/") + "/graphql"
        self.selector = {"repositoryLocationName": location, "repositoryName": repository}
        self.timeout = timeout

    def _where(self) -> str:
        return f"Dagster (code location '{self.selector['repositoryLocationName']}')"

    def _call(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        shown = redact_url(self.endpoint)
        try:
            response = httpx.post(
                self.endpoint,
                json={"query": query, "variables": variables},
                timeout=self.timeout,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("Dagster at %s is unreachable: %s", shown, type(exc).__name__)
            raise LaunchUnavailable(f"{self._where()} is unreachable") from None
        except httpx.HTTPError as exc:
            log.warning("Dagster at %s failed: %s", shown, type(exc).__name__)
            raise LaunchUnavailable(f"{self._where()} did not answer") from None
        if response.status_code != 200:
            log.warning("Dagster at %s answered %s", shown, response.status_code)
            refused = LaunchFailed if response.status_code < 500 else LaunchUnavailable
            raise refused(f"{self._where()} answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            log.warning("Dagster at %s answered something that is not JSON", shown)
            raise LaunchUnavailable(f"{self._where()} did not answer in JSON") from None
        if body.get("errors"):
            log.warning("Dagster at %s refused: %s", shown, body["errors"])
            raise LaunchFailed(f"{self._where()} refused the request")
        return body["data"]

    def _refused(self, what: str, typename: str) -> Exception:
        refused = LaunchFailed if typename in DEFINITIVE else LaunchUnavailable
        return refused(f"{self._where()} refused the {what}: {typename}")

    def launch(
        self,
        batch_id: str,
        run_config: dict[str, Any],
        tags: dict[str, str],
        job: str = L.BATCH_JOB,
        partitions: str = L.BATCH_PARTITIONS,
    ) -> str:
        """Adds the partition ``batch_id`` of ``partitions`` (a repeat is harmless) and queues
        ``job``'s run of it; returns the run id. Other partitioned jobs (``dataset_job`` by
        conquest type) are launched the same way."""
        added = self._call(
            ADD_PARTITION,
            {"selector": self.selector, "name": partitions, "key": batch_id},
        )["addDynamicPartition"]
        if added["__typename"] not in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        ):
            log.warning("partition refused: %s %s", added["__typename"], added.get("message"))
            raise self._refused("partition", added["__typename"])
        tags = {**tags, L.TAG_PARTITION: batch_id}
        params = {
            "selector": {**self.selector, "jobName": job},
            "runConfigData": run_config,
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        result = self._call(LAUNCH_RUN, {"params": params})["launchPipelineExecution"]
        if result["__typename"] != "LaunchRunSuccess":
            log.warning("run refused: %s %s", result["__typename"], result)
            raise self._refused("run", result["__typename"])
        return result["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        """The run's Dagster status (``QUEUED``, ``STARTED``, ``SUCCESS``, ``FAILURE``, ...)."""
        return self.run_state(run_id).status

    def run_state(self, run_id: str) -> RunState:
        """The run's Dagster status, its tags (``dagster/will_retry`` on a failed run) and its
        end time."""
        found = self._call(RUN_STATUS, {"runId": run_id})["runOrError"]
        if found["__typename"] != "Run":
            raise LaunchFailed(f"{self._where()} has no run {run_id}: {found['__typename']}")
        tags = {t["key"]: t["value"] for t in found.get("tags") or []}
        return RunState(found["status"], tags, found.get("endTime"))

    def location_error(self) -> str | None:
        """Dagster's error for this code location (its code server died, its code does not
        load), or None while it is loaded."""
        found = self._call(LOCATION_STATUS, {})["workspaceOrError"]
        for entry in found.get("locationEntries") or []:
            if entry["name"] == self.selector["repositoryLocationName"]:
                loaded = entry.get("locationOrLoadError") or {}
                if loaded.get("__typename") == "PythonError":
                    return str(loaded.get("message") or "the code location failed")[:500]
        return None

    def reload_location(self) -> str:
        """Reload this code location (a new code server is started for it); Dagster's answer
        type."""
        name = self.selector["repositoryLocationName"]
        return self._call(RELOAD_LOCATION, {"name": name})["reloadRepositoryLocation"]["__typename"]

    def terminate(self, run_id: str) -> bool:
        """Ask Dagster to stop a run (a queued one never starts); False when it would not."""
        found = self._call(TERMINATE_RUN, {"runId": run_id})["terminateRun"]
        return found["__typename"] == "TerminateRunSuccess"
