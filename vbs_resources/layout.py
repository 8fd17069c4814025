"""Where things live: bucket paths, ids and Dagster names, in one place.

The sensor, the assets, the API and the CLI build every bucket path and every Dagster name
through these functions, never from string literals, so a layout change is made here once.
Ids are opaque (``batch_<hex>``, ``file-<hex>``); no path is ever built from a client's text.
"""

from __future__ import annotations

import hashlib
import re
import uuid

# ---- Dagster names -----------------------------------------------------------------------

CODE_LOCATION = "vbs"
REPOSITORY = "__repository__"  # the implicit repository of a Definitions object
BATCH_JOB = "batch_job"
BATCH_PARTITIONS = "batches"
BATCH_GROUP = "batches"
BATCH_INPUT = "batch_input"
BATCH_OUTPUT = "batch_output"
INBOX_SENSOR = "inbox_sensor"
RECONCILE_SENSOR = "batch_reconciler"

TAG_BATCH_ID = "vbs/batch_id"
TAG_SOURCE_FILE = "vbs/source_file"
# Set by a run that found it could not proceed (and left the batch untouched).
TAG_REFUSED = "vbs/refused"
TAG_ENGINE_UNAVAILABLE = "vbs/engine_unavailable"
TAG_PARTITION = "dagster/partition"


def batch_run_tags(batch_id: str, source_file: str) -> dict[str, str]:
    """Tags on every batch run, whoever starts it (``dagster/partition`` is added by Dagster for
    a sensor's run request and by the API for a run it launches)."""
    return {TAG_BATCH_ID: batch_id, TAG_SOURCE_FILE: source_file[:200]}


# ---- ids ---------------------------------------------------------------------------------

BATCH_ID_PATTERN = r"^batch_[A-Za-z0-9]{8,64}$"
FILE_ID_PATTERN = r"^file-[A-Za-z0-9-]{8,80}$"
_BATCH_ID = re.compile(BATCH_ID_PATTERN)
_FILE_ID = re.compile(FILE_ID_PATTERN)


def is_batch_id(value: str) -> bool:
    return bool(_BATCH_ID.fullmatch(value))


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def content_batch_id(sha256: str) -> str:
    """A dropped file's batch id, derived from its content (file and sidecar)."""
    return f"batch_{sha256[:32]}"


def is_file_id(value: str) -> bool:
    return bool(_FILE_ID.fullmatch(value))


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def dropped_file_id(sha256: str) -> str:
    """A dropped file's input file id, derived from its content as an upload gets its own."""
    return f"file-{sha256[:24]}"


def result_file_id(batch_id: str, kind: str) -> str:
    """The file id of a batch's ``output`` or ``errors`` file."""
    return f"file-{kind}-{batch_id.removeprefix('batch_')}"


def new_request_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def conquest_id(batch_id: str, custom_id: str) -> str:
    """A conquest's id, the same every time its batch's conquests are made."""
    digest = hashlib.sha256(f"{batch_id}\n{custom_id}".encode()).hexdigest()
    return f"cq_{digest[:32]}"


# ---- curation ------------------------------------------------------------------------------

CONQUESTS = "conquests"
LABEL_STUDIO_TASKS = "label_studio_tasks"
LABEL_STUDIO_SYNC = "label_studio_sync"
CURATION_GROUP = "curation"
CURATED_DATASET = "curated_dataset"
DATASET_JOB = "dataset_job"
CURATION_JOB = "curation_job"  # a typed batch's conquests and their Label Studio tasks
CURATION_SENSOR = "typed_batch_curation"
CONQUEST_TYPE_PARTITIONS = "conquest_types"
CONQUEST_TYPE_SENSOR = "conquest_type_partitions"
# Batch metadata keys: the conquest type a batch's results are curated as, and the uploaded
# file (purpose user_data) holding the records its prompts were made from.
META_CONQUEST_TYPE = "conquest_type"
META_CONQUEST_TYPE_VERSION = "conquest_type_version"
META_CONQUEST_RECORDS = "conquest_records_file"


# ---- the inbox ---------------------------------------------------------------------------

INBOX = "inbox"
INBOX_DUPLICATES = f"{INBOX}/duplicates"
# Folders vbs itself keeps inside the inbox; any other sub-folder is reported.
INBOX_OWN_FOLDERS = frozenset({"duplicates"})
SIDECAR_SUFFIX = ".metadata.json"
BATCH_SUFFIX = ".jsonl"


def inbox_path(name: str) -> str:
    return f"{INBOX}/{name}"


def is_hidden(name: str) -> bool:
    """Names the sensor never considers: written under these, then renamed into place."""
    return name.startswith(".")


def is_batch_file_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(BATCH_SUFFIX)


def is_sidecar_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(SIDECAR_SUFFIX)


def is_temporary_name(name: str) -> bool:
    """The documented write-then-rename names (``jobs.jsonl.part``, ``.jobs.jsonl``, ...)."""
    lowered = name.lower()
    return is_hidden(name) or lowered.endswith((".part", ".tmp", ".partial", ".crdownload"))


def batch_stem(name: str) -> str:
    """``jobs`` for ``jobs.jsonl`` and for ``jobs.metadata.json`` (any letter case)."""
    lowered = name.lower()
    for suffix in (SIDECAR_SUFFIX, BATCH_SUFFIX):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def sidecar_name(batch_file_name: str) -> str:
    return batch_stem(batch_file_name) + SIDECAR_SUFFIX


# ---- a batch's folder ----------------------------------------------------------------------

INPUT = "input.jsonl"
SIDECAR = "sidecar.json"
REQUESTS = "requests.parquet"
OUTPUT = "output.jsonl"
ERRORS = "errors.jsonl"
RESULTS = "results.parquet"  # the results lake's row per line (vbs_resources/lake.py)
CHECKPOINT = "checkpoint"
CHECKPOINT_MANIFEST = f"{CHECKPOINT}/manifest.json"
_CHUNK = re.compile(r"^chunk-(\d{5,})\.jsonl$")


BATCHES = "batches"


def batch_folder(batch_id: str) -> str:
    if not is_batch_id(batch_id):
        raise ValueError(f"{batch_id[:80]!r} is not a batch id")
    return f"{BATCHES}/{batch_id}"


def every_batch_file(name: str) -> str:
    """A glob of one file (``RESULTS``, ...) across all batches, for DuckDB's readers."""
    return f"{BATCHES}/*/{name}"


def batch_file(batch_id: str, name: str) -> str:
    """Path of one of a batch's files (``INPUT``, ``OUTPUT``, ...) in the bucket."""
    return f"{batch_folder(batch_id)}/{name}"


def checkpoint_folder(batch_id: str) -> str:
    return batch_file(batch_id, CHECKPOINT)


def chunk_file(batch_id: str, index: int) -> str:
    return batch_file(batch_id, f"{CHECKPOINT}/chunk-{index:05d}.jsonl")


def chunk_index(name: str) -> int | None:
    """The index of a checkpoint chunk's file name, None for any other name."""
    match = _CHUNK.fullmatch(name)
    return int(match.group(1)) if match else None


# ---- curated datasets ----------------------------------------------------------------------

DATASETS = "datasets"
TRAIN, EVAL, ICL = "train.jsonl", "eval.jsonl", "icl.jsonl"
DATASET_MANIFEST = "manifest.json"  # written last: a folder without it is an unfinished write
DATASET_VERSION_PATTERN = r"^[a-z][a-z0-9_]{0,63}-[0-9a-f]{16}$"
_DATASET_VERSION = re.compile(DATASET_VERSION_PATTERN)


def dataset_version(type_id: str, content_sha256: str) -> str:
    """A dataset's version: its type and the hash of its files' content."""
    return f"{type_id}-{content_sha256[:16]}"


def is_dataset_version(value: str) -> bool:
    return bool(_DATASET_VERSION.fullmatch(value))


def dataset_folder(version: str) -> str:
    if not is_dataset_version(version):
        raise ValueError(f"{version[:80]!r} is not a dataset version")
    return f"{DATASETS}/{version}"


def dataset_file(version: str, name: str) -> str:
    return f"{dataset_folder(version)}/{name}"


# ---- uploaded files ------------------------------------------------------------------------

FILES = "files"


def uploaded_file(file_id: str) -> str:
    if not _FILE_ID.fullmatch(file_id):
        raise ValueError(f"{file_id[:80]!r} is not a file id")
    return f"{FILES}/{file_id}.jsonl"


# ---- fine-tuning ---------------------------------------------------------------------------

TRAINING_GROUP = "training"
FINE_TUNED_ADAPTER = "fine_tuned_adapter"
ADAPTER_EVAL = "adapter_eval"
DEPLOYED_MODEL = "deployed_model"
FINE_TUNING_JOB = "fine_tuning_job"  # trains, evaluates and deploys one dataset version
TRAINING_JOB = "training_job"  # trains and evaluates, leaving deployment to a person
DEPLOY_JOB = "deploy_job"
DATASET_VERSION_PARTITIONS = "dataset_versions"
RETRAIN_SCHEDULE = "retraining_schedule"
RETRAIN_SENSOR = "retrain_on_new_dataset"
TAG_FINE_TUNING_JOB = "vbs/fine_tuning_job"
TAG_DEPLOYMENT = "vbs/deployment"
TAG_RETRAIN = "vbs/retrain"
# A training file uploaded through the API becomes a dataset of this pseudo-type.
UPLOADED_DATASET_TYPE = "upload"
ADAPTERS = "adapters"
JOB_ID_PATTERN = r"^ftjob-[A-Za-z0-9]{8,64}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.fullmatch(value))


def adapter_folder(job_id: str) -> str:
    """A job's adapter, in PEFT format: ``adapters/<job id>/``."""
    if not is_job_id(job_id):
        raise ValueError(f"{job_id[:80]!r} is not a fine-tuning job id")
    return f"{ADAPTERS}/{job_id}"


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's form, ``ft:<base>:<suffix>:<id>``: the id is the job's, so a name is never
    reused; the suffix is the client's, reduced to what a model name may hold."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", suffix or "").strip("-")[:40] or "vbs"
    return f"ft:{base}:{clean}:{job_id.removeprefix('ftjob-')[:12]}"


DEPLOYMENT_ID_PATTERN = r"^ftdeploy-[A-Za-z0-9]{8,64}$"
_DEPLOYMENT_ID = re.compile(DEPLOYMENT_ID_PATTERN)
FINE_TUNING_SENSOR = "fine_tuning_reconciler"
WEBHOOK_SENSOR = "webhook_delivery"


def new_deployment_id() -> str:
    return f"ftdeploy-{uuid.uuid4().hex[:24]}"


def is_deployment_id(value: str) -> bool:
    return bool(_DEPLOYMENT_ID.fullmatch(value))
