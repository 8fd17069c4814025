"""Curation: conquest types, the conquests made from typed batches, and their annotations."""

from vbs_resources.curation.registry import (
    ConquestTypeFileError,
    ConquestTypes,
    TaskRegistry,
    load_conquest_types,
    load_type_file,
    task_registry,
)
from vbs_resources.curation.types import (
    CURATION_FIELDS,
    ConquestType,
    ConquestTypeError,
    DataSource,
    Question,
    RecordError,
)

__all__ = [
    "CURATION_FIELDS",
    "ConquestType",
    "ConquestTypeError",
    "ConquestTypeFileError",
    "ConquestTypes",
    "DataSource",
    "Question",
    "RecordError",
    "TaskRegistry",
    "load_conquest_types",
    "load_type_file",
    "task_registry",
]
