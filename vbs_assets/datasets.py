"""``curated_dataset``: a conquest type's gold conquests as a versioned training dataset, with
the blocking checks that gate what trains on it.

One partition per conquest type (the ``conquest_type_partitions`` sensor adds them; ``vbs
datasets build`` adds a missing one before launching). Each build reads the type's gold
conquests (the catalog, with Polars), renders them through the type's export templates, and
writes ``datasets/<version>/`` (``train.jsonl``, ``eval.jsonl``, ``icl.jsonl``,
``manifest.json``), where the version is the hash of the content; it is also the asset's
Dagster data version.
Building again with no new annotation finds the same version and writes nothing.
"""

import json

import dagster as dg
from pydantic import Field

from vbs_assets.curation import _type, conquests
from vbs_assets.partitions import conquest_type_partitions
from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.curation import ConquestTypes
from vbs_resources.curation.datasets import (
    CurationPolicy,
    DatasetBuild,
    build_dataset,
    check_example,
    prompt_key,
    write_dataset,
)
from vbs_resources.lake import catalog_frame, gold_query, rating_counts


class CuratedDatasetConfig(dg.Config):
    """Overrides of the curation policy for one build."""

    min_rating: int | None = Field(
        default=None, ge=1, le=5, description="Gold rating threshold (VBS_GOLD_MIN_RATING)."
    )
    eval_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="Prompts held out (VBS_DATASET_EVAL_FRACTION)."
    )
    min_examples: int | None = Field(
        default=None,
        ge=0,
        description="Fewer examples fail the min_examples check (VBS_DATASET_MIN_EXAMPLES).",
    )


def _cell(text: object, width: int = 160) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")[:width]


def _sample(build: DatasetBuild) -> str:
    lines = ["| split | user | assistant |", "|---|---|---|"]
    for split, examples in (("train", build.train[:4]), ("eval", build.eval[:2])):
        for example in examples:
            user = next((m["content"] for m in example.messages if m["role"] == "user"), "")
            lines.append(f"| {split} | {_cell(user)} | {_cell(example.messages[-1]['content'])} |")
    return "\n".join(lines)


def _histogram(counts: dict[str, int]) -> str:
    top = max(counts.values()) or 1
    lines = ["| rating | conquests | |", "|---|---|---|"]
    lines += [f"| {k} | {n} | {'█' * round(20 * n / top)} |" for k, n in counts.items()]
    return "\n".join(lines)


# Evaluated in the asset's own step, on the files it just wrote: a blocking check that fails
# fails the step, so nothing downstream (training) runs on the version.
CHECKS = [
    dg.AssetCheckSpec(
        "min_examples",
        asset=L.CURATED_DATASET,
        blocking=True,
        description="Enough examples to train on (VBS_DATASET_MIN_EXAMPLES, train and eval "
        "together), and at least one held out for eval.",
    ),
    dg.AssetCheckSpec(
        "chat_format_valid",
        asset=L.CURATED_DATASET,
        blocking=True,
        description="Every line of train.jsonl and eval.jsonl is a chat example in OpenAI's "
        "fine-tuning format (roles system/user/assistant, text, the assistant's turn last).",
    ),
    dg.AssetCheckSpec(
        "no_eval_leakage",
        asset=L.CURATED_DATASET,
        blocking=True,
        description="No eval prompt (its user turns) is also a train or few-shot (icl) prompt.",
    ),
]


def _lines(bucket: Bucket, version: str) -> dict[str, list[bytes]]:
    """The lines of the version's three files, as written, read once for every check."""
    lines = {}
    for name in (L.TRAIN, L.EVAL, L.ICL):
        with bucket.open(L.dataset_file(version, name), "rb") as fh:
            lines[name] = [line for line in fh if line.strip()]
    return lines


def check_min_examples(build: DatasetBuild, needed: int) -> dg.AssetCheckResult:
    total = len(build.train) + len(build.eval)
    problems = []
    if total < needed:
        problems.append(f"{total} examples, fewer than {needed}")
    if needed and not build.eval:
        problems.append(
            "none held out for eval: a dataset needs two prompts or more, and an eval_fraction "
            "above 0 (VBS_DATASET_EVAL_FRACTION)"
        )
    return dg.AssetCheckResult(
        check_name="min_examples",
        passed=not problems,
        metadata={"examples": total, "eval": len(build.eval), "min": needed,
                  "problems": dg.MetadataValue.json(problems)},
    )  # fmt: skip


def check_chat_format(lines: dict[str, list[bytes]]) -> dg.AssetCheckResult:
    problems: list[str] = []
    for name in (L.TRAIN, L.EVAL):
        for number, line in enumerate(lines[name], start=1):
            try:
                check_example(line)
            except ValueError as exc:
                problems.append(f"{name} line {number}: {exc}")
    return dg.AssetCheckResult(
        check_name="chat_format_valid",
        passed=not problems,
        metadata={"problems": dg.MetadataValue.json(problems[:20]), "count": len(problems)},
    )


def check_leakage(lines: dict[str, list[bytes]]) -> dg.AssetCheckResult:
    def prompts(name: str) -> set[str]:
        return {prompt_key(json.loads(x)["messages"]) for x in lines[name]}

    try:
        evals = prompts(L.EVAL)
        leaked = {name: len(evals & prompts(name)) for name in (L.TRAIN, L.ICL)}
    except (ValueError, KeyError, TypeError) as exc:
        return dg.AssetCheckResult(
            check_name="no_eval_leakage", passed=False, metadata={"problem": str(exc)[:500]}
        )
    return dg.AssetCheckResult(
        check_name="no_eval_leakage",
        passed=not any(leaked.values()),
        metadata={
            "eval_prompts": len(evals),
            "leaked": dg.MetadataValue.json(leaked),
            "problems": dg.MetadataValue.json(
                [f"{n} eval prompts also in {name}" for name, n in leaked.items() if n]
            ),
        },
    )


@dg.asset(
    name=L.CURATED_DATASET,
    check_specs=CHECKS,
    partitions_def=conquest_type_partitions,
    deps=[dg.AssetDep(conquests, partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
    kinds={"jsonl"},
    group_name=L.CURATION_GROUP,
)
def curated_dataset(
    context: dg.AssetExecutionContext,
    config: CuratedDatasetConfig,
    bucket: Bucket,
    catalog: Catalog,
    conquest_types: ConquestTypes,
    curation: CurationPolicy,
) -> dg.MaterializeResult:
    """The type's gold conquests (a gold star, or a rating at or above the threshold) as chat
    examples, de-duplicated and split into train and eval by prompt, in
    ``datasets/<version>/``; the version is the content hash and the Dagster data version."""
    type_id = context.partition_key
    conquest_type = _type(context, conquest_types, type_id)
    if isinstance(conquest_type, dg.MaterializeResult):
        raise dg.Failure(description=str(conquest_type.metadata["skipped"]))
    min_rating = config.min_rating or curation.gold_min_rating
    eval_fraction = curation.eval_fraction if config.eval_fraction is None else config.eval_fraction
    gold = catalog_frame(catalog, gold_query(type_id, min_rating))
    context.log.info(f"{type_id}: {gold.height} gold conquests (rating >= {min_rating} or star)")
    build = build_dataset(conquest_type, gold, eval_fraction, catalog.datasets.sides(type_id))
    for problem in build.skipped[:20]:
        context.log.warning(f"skipped {problem}")
    for reason in build.excluded[:20]:
        context.log.info(f"excluded {reason}")
    options = {"min_rating": min_rating, "eval_fraction": eval_fraction}
    version = build.version
    written = write_dataset(bucket, build, options)
    lines = _lines(bucket, version)
    min_examples = curation.min_examples if config.min_examples is None else config.min_examples
    checks = [
        check_min_examples(build, min_examples),
        check_chat_format(lines),
        check_leakage(lines),
    ]
    outcome = {c.check_name: {"passed": c.passed, "problems": _problems(c)} for c in checks}
    catalog.datasets.record(build.catalog_row(options, context.run_id), outcome, build.sides)
    # The version can be trained on: fine_tuned_adapter is partitioned by dataset version.
    if not context.instance.has_dynamic_partition(L.DATASET_VERSION_PARTITIONS, version):
        context.instance.add_dynamic_partitions(L.DATASET_VERSION_PARTITIONS, [version])
    context.log.info(
        f"{version}: {len(build.train)} train, {len(build.eval)} eval, "
        + ("written" if written else "already there, nothing written")
    )
    return dg.MaterializeResult(
        metadata={
            "version": version,
            "path": bucket.uri(L.dataset_folder(version)),
            "conquest_type": type_id,
            "type_version": build.type_version,
            "written": written,
            "gold_conquests": build.gold,
            "train": len(build.train),
            "eval": len(build.eval),
            "icl": build.icl_count,
            "duplicates_dropped": build.duplicates,
            "skipped": len(build.skipped),
            "excluded": len(build.excluded),
            "min_rating": min_rating,
            "eval_fraction": eval_fraction,
            "rating_histogram": dg.MetadataValue.md(_histogram(rating_counts(catalog, type_id))),
            "sample": dg.MetadataValue.md(_sample(build)),
            "dagster/row_count": len(build.train) + len(build.eval),
        },
        data_version=dg.DataVersion(version),
        check_results=checks,
    )


def _problems(check: dg.AssetCheckResult) -> list[str]:
    """What a check's metadata says went wrong, for the catalog's record of the build."""
    if check.passed:
        return []
    metadata = check.metadata or {}
    found = metadata.get("problems") or metadata.get("problem")
    value = getattr(found, "value", found)
    if isinstance(value, list):
        return [str(p)[:300] for p in value[:20]]
    return [str(value)[:300]] if value else [f"{check.check_name} failed"]
