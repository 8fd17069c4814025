"""Starts a batch's run through the Dagster webserver's GraphQL API.

A file dropped into the inbox waits for the sensor daemon, which evaluates sensors at most every
five seconds. A batch created through the API needs no such wait: the API adds the batch's
partition and launches ``batch_job`` for it directly, with the run config and tags the sensor
would have used, so the run is the same one either way (same job, partition, assets and checks).
"""

from __future__ import annotations

from typing import Any

import httpx

from vbs_assets.schemas import BatchOptions, batch_run_tags

ADD_PARTITION = """
mutation VbsAddBatchPartition($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename
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


class LaunchUnavailable(Exception):
    """The webserver could not be reached: nothing was launched, the inbox path can take over."""


class LaunchFailed(Exception):
    """The webserver answered and refused the launch."""


class BatchLauncher:
    """Launches ``batch_job`` runs through ``{url}/graphql`` (``vbs serve`` passes its own
    webserver's URL as ``VBS_DAGSTER_URL``)."""

    def __init__(
        self,
        url: str,
        location: str = "vbs",
        repository: str = "__repository__",
        timeout: float = 30.0,
    ) -> None:
        self.endpoint = url.rstrip("/") + "/graphql"
        self.selector = {"repositoryLocationName": location, "repositoryName": repository}
        self.timeout = timeout

    def _where(self) -> str:
        return f"Dagster ({self.endpoint}, code location {self.selector['repositoryLocationName']})"

    def _call(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        try:
            response = httpx.post(
                self.endpoint,
                json={"query": query, "variables": variables},
                timeout=self.timeout,
            )
        except httpx.ConnectError as exc:
            raise LaunchUnavailable(f"{self.endpoint}: {exc}") from exc
        if response.status_code != 200:
            raise LaunchFailed(f"{self.endpoint} answered {response.status_code}")
        body = response.json()
        if body.get("errors"):
            raise LaunchFailed("; ".join(e.get("message", "") for e in body["errors"]))
        return body["data"]

    def launch(self, batch_id: str, options: BatchOptions, source_file: str) -> str:
        """Adds the partition (a repeat is harmless) and queues its run; returns the run id."""
        added = self._call(
            ADD_PARTITION, {"selector": self.selector, "name": "batches", "key": batch_id}
        )["addDynamicPartition"]
        if added["__typename"] not in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        ):
            raise LaunchFailed(
                f"{self._where()} refused the partition: "
                f"{added['__typename']}: {added.get('message', '')}"
            )
        tags = {**batch_run_tags(batch_id, source_file), "dagster/partition": batch_id}
        params = {
            "selector": {**self.selector, "jobName": "batch_job"},
            "runConfigData": options.run_config(),
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        result = self._call(LAUNCH_RUN, {"params": params})["launchPipelineExecution"]
        if result["__typename"] != "LaunchRunSuccess":
            detail = result.get("message") or "; ".join(
                e["message"] for e in result.get("errors", [])
            )
            raise LaunchFailed(f"{self._where()} refused the run: {result['__typename']}: {detail}")
        return result["run"]["runId"]
