"""The OpenAI-compatible HTTP API (files, batches, models) over the Dagster pipeline."""
