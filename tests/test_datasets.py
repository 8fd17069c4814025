"""Curated datasets: gold conquests become chat examples through their type's export templates,
de-duplicated and split by prompt without leakage; the version is the content hash, the same
for the same content and new for anything else; the checks gate what trains on it (real
Dagster materializations on the real catalog and bucket)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time

import dagster as dg
import pytest
import sqlalchemy as sa

from tests.conftest import MODEL, resources_for
from vbs_assets.datasets import curated_dataset
from vbs_resources import layout as L
from vbs_resources.curation import ConquestTypes
from vbs_resources.curation.datasets import (
    build_dataset,
    check_example,
    failed_checks,
    held_out,
    prompt_key,
)
from vbs_resources.curation.lifecycle import ConquestLifecycle, ConquestRefused

SUPPORT = ConquestTypes().registry().get("support_reply")
TYPE = "support_reply"


def record(n: int) -> dict:
    return {
        "ticket_subject": f"Order {n} — late 📦",
        "ticket_body": f"Where is my order #{n}? It was due on Monday.",
        "product": "Mugs" if n % 2 else None,
        "order_history": [{"id": n, "item": "mug"}] if n % 3 == 0 else None,
    }


def conquest(n: int, batch: str = "batch_dataset000", status: str = "COMPLETED", **data) -> dict:
    """A conquest as the ``conquests`` asset makes it from a typed batch's result line."""
    raw = {k: v for k, v in (data or record(n)).items() if v is not None}
    checked = SUPPORT.check_record(raw)
    completed = status == "COMPLETED"
    return {
        "id": L.conquest_id(batch, f"t{n}"), "type": TYPE, "type_version": SUPPORT.version,
        "status": status, "result": None, "input_data": checked, "prompt": SUPPORT.prompt(checked),
        "prediction": f"Sorry for the wait! Order {n} ships today." if completed else None,
        "error": None if completed else {"code": "model_not_found", "message": "no"},
        "model": "m", "batch_id": batch, "custom_id": f"t{n}", "created_at": 1000 + n,
        "updated_at": 1000.0 + n,
    }  # fmt: skip


def annotate(catalog, conquest_id: str, at: float | None = None, **fields) -> None:
    values = {"is_gold_star": False, "rating": None, "feedback": None, "improvement_notes": None,
              "answers": {}, "source": "api", "source_ref": None,
              "edited_at": at or time.time(), **fields}  # fmt: skip
    ConquestLifecycle(catalog).annotate(conquest_id, values, "api")


@pytest.fixture
def curated(tmp_path, instance):
    resources = resources_for(
        tmp_path / "vbs", VBS_DATASET_MIN_EXAMPLES="5", VBS_DATASET_EVAL_FRACTION="0.3"
    )
    instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, [TYPE])
    return resources, instance


def build(resources, instance, raise_on_error: bool = True, **config) -> tuple[dict, object]:
    result = dg.materialize(
        [curated_dataset],
        partition_key=TYPE,
        instance=instance,
        resources=resources,
        run_config=dg.RunConfig(ops={L.CURATED_DATASET: {"config": config}}),
        raise_on_error=raise_on_error,
    )
    events = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in events[0].materialization.metadata.items()} if events else {}
    return metadata, result


def checks_of(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def lines(bucket, version: str, name: str) -> list[dict]:
    return [json.loads(x) for x in bucket.read_text(L.dataset_file(version, name)).splitlines()]


def test_gold_conquests_become_chat_examples_split_without_leakage(curated):
    resources, instance = curated
    catalog, bucket = resources["catalog"], resources["bucket"]
    rows = [conquest(n) for n in range(14)]
    rows.append(conquest(14, status="FAILED"))
    # The same ticket answered the same way in a later batch: one example, not two.
    rows.append({**conquest(0, batch="batch_dataset001"), "created_at": 5000})
    catalog.conquests.add(rows)
    ids = [r["id"] for r in rows]
    for n in range(6):
        annotate(catalog, ids[n], is_gold_star=True, answers={"resolves_issue": "yes"})
    for n in range(6, 10):
        annotate(catalog, ids[n], rating=4, feedback="fine")  # gold by the rating threshold
    for n in range(10, 13):
        annotate(catalog, ids[n], rating=3)  # not gold
    # A failed request has no answer to be gold: refused, and it never becomes a VICTORY.
    with pytest.raises(ConquestRefused, match="FAILED") as refused:
        annotate(catalog, ids[14], is_gold_star=True)
    assert refused.value.field == "isGoldStar"
    annotate(catalog, ids[14], rating=1, feedback="no answer")  # said of it, no result
    assert catalog.conquests.get(ids[14])["result"] is None
    annotate(catalog, ids[15], is_gold_star=True)  # the repeat

    metadata, result = build(resources, instance, eval_fraction=0.25)
    version = metadata["version"]
    assert L.is_dataset_version(version) and version.startswith(TYPE + "-")
    assert metadata["gold_conquests"] == 11 and metadata["duplicates_dropped"] == 1
    assert metadata["train"] + metadata["eval"] == 10 and metadata["eval"] >= 1
    assert metadata["written"] is True
    assert checks_of(result) == {
        "min_examples": True, "chat_format_valid": True, "no_eval_leakage": True,
    }  # fmt: skip
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.tags["dagster/data_version"] == version

    train, evals = lines(bucket, version, L.TRAIN), lines(bucket, version, L.EVAL)
    for example in train + evals:
        roles = [m["role"] for m in example["messages"]]
        assert roles == ["system", "user", "assistant"] and set(example) == {"messages"}
        check_example(json.dumps(example))
    by_subject = {e["messages"][1]["content"].splitlines()[0]: e for e in train + evals}
    mug = by_subject["Subject: Order 3 — late 📦"]["messages"]
    assert "support agent for Mugs" in mug[0]["content"]
    assert '[{"id": 3, "item": "mug"}]' in mug[1]["content"]  # structured fields as JSON
    assert mug[2]["content"] == "Sorry for the wait! Order 3 ships today."
    assert "Subject: Order 11 — late 📦" not in by_subject  # rated 3
    assert "Subject: Order 14 — late 📦" not in by_subject  # failed
    train_prompts = {prompt_key(e["messages"]) for e in train}
    assert not train_prompts & {prompt_key(e["messages"]) for e in evals}

    icl = lines(bucket, version, L.ICL)
    assert len(icl) == len(train)
    assert {prompt_key(e["messages"]) for e in icl} == train_prompts
    first = icl[0]
    assert set(first["input"]) <= set(SUPPORT.export.finetuning_format.input_fields)
    assert set(first["output"]) == {"prediction"}
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]

    row = catalog.datasets.get(version)
    assert (row["train_count"], row["eval_count"]) == (metadata["train"], metadata["eval"])
    listed = set(row["conquest_ids"]["train"]) | set(row["conquest_ids"]["eval"])
    assert listed <= set(ids[:10]) | {ids[15]} and len(listed) == 10
    manifest = json.loads(bucket.read_text(L.dataset_file(version, L.DATASET_MANIFEST)))
    assert manifest["conquest_ids"] == row["conquest_ids"]
    assert manifest["counts"] == {"train": len(train), "eval": len(evals), "icl": len(icl)}


def test_the_version_changes_exactly_when_the_content_changes(curated):
    resources, instance = curated
    catalog, bucket = resources["catalog"], resources["bucket"]
    rows = [conquest(n) for n in range(8)]
    catalog.conquests.add(rows)
    for row in rows[:6]:
        annotate(catalog, row["id"], is_gold_star=True)

    first, _ = build(resources, instance)
    v1 = first["version"]
    train = bucket.path(L.dataset_file(v1, L.TRAIN))
    stamp = bucket.fs.modified(train)

    again, _ = build(resources, instance)  # nothing new: same version, nothing written
    assert again["version"] == v1 and again["written"] is False
    assert bucket.fs.modified(train) == stamp

    # A build killed before its manifest: the next one finishes the folder.
    bucket.remove(L.dataset_file(v1, L.DATASET_MANIFEST))
    redone, _ = build(resources, instance)
    assert redone["version"] == v1 and redone["written"] is True
    assert bucket.exists(L.dataset_file(v1, L.DATASET_MANIFEST))

    # A comment the export templates do not read is not content.
    annotate(catalog, rows[0]["id"], is_gold_star=True, feedback="Lovely")
    assert build(resources, instance)[0]["version"] == v1

    annotate(catalog, rows[6]["id"], rating=5)
    grown, _ = build(resources, instance)
    v2 = grown["version"]
    assert v2 != v1 and grown["train"] + grown["eval"] == 7 and grown["written"] is True

    annotate(catalog, rows[6]["id"], rating=1)  # taken back: the first content, the first version
    back, _ = build(resources, instance)
    assert back["version"] == v1 and back["written"] is False
    # A stricter threshold is other content too.
    annotate(catalog, rows[7]["id"], rating=4)
    assert build(resources, instance)[0]["version"] != v1
    assert build(resources, instance, min_rating=5)[0]["version"] == v1

    assert {r["version"] for r in catalog.datasets.list(type_id=TYPE)} == {v1, v2} | {
        build(resources, instance)[0]["version"]
    }
    assert catalog.datasets.list(type_id=TYPE)[0]["version"] != v1  # the latest build first


def test_too_few_examples_fail_the_blocking_check(curated):
    resources, instance = curated
    catalog = resources["catalog"]
    rows = [conquest(n) for n in range(3)]
    catalog.conquests.add(rows)
    for row in rows:
        annotate(catalog, row["id"], is_gold_star=True)
    metadata, result = build(resources, instance, raise_on_error=False)
    assert metadata["train"] + metadata["eval"] == 3
    assert checks_of(result)["min_examples"] is False
    assert not result.success  # blocking: what trains on the dataset does not run


def test_a_plain_batch_and_a_record_that_no_longer_fits_its_type(curated):
    resources, instance = curated
    catalog = resources["catalog"]
    plain = {**conquest(0), "input_data": {"messages": [{"role": "user", "content": "Hi 👋"}]}}
    parts = {**conquest(9), "input_data": {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Where is"},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "my mug?"}]},
    ]}}  # fmt: skip
    system_only = {**conquest(10), "input_data": {"messages": [{"role": "system", "content": "x"}]}}
    stale = {**conquest(1), "input_data": {"ticket_subject": "Old", "legacy_field": "x"}}
    silent = {**conquest(2), "prediction": "  \n"}  # the model said nothing
    surrogate = {**conquest(11), "input_data": {**record(11), "ticket_body": "bad \ud800 text"}}
    rows = [
        plain,
        parts,
        system_only,
        stale,
        silent,
        *(conquest(n) for n in range(3, 9)),
    ]
    # Text that is not Unicode never reaches the catalog: the write fails whole.
    with pytest.raises(sa.exc.StatementError, match="unpaired surrogate"):
        catalog.conquests.add([*rows, surrogate])
    assert (
        catalog.conquests.get(surrogate["id"]) is None
        and catalog.conquests.get(plain["id"]) is None
    )
    catalog.conquests.add(rows)
    for row in rows:
        annotate(catalog, row["id"], is_gold_star=True)
    metadata, result = build(resources, instance)
    assert metadata["skipped"] == 3 and metadata["train"] + metadata["eval"] == 8
    assert checks_of(result)["chat_format_valid"] is True
    version = metadata["version"]
    examples = lines(resources["bucket"], version, L.TRAIN) + lines(
        resources["bucket"], version, L.EVAL
    )
    assert {"messages": [{"role": "user", "content": "Hi 👋"},
                         {"role": "assistant", "content": plain["prediction"]}]} in examples  # fmt: skip
    assert {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Where is\nmy mug?"},
                         {"role": "assistant", "content": parts["prediction"]}]} in examples  # fmt: skip


def test_an_exclude_if_answer_keeps_a_gold_conquest_out(tmp_path, instance):
    candidate = ConquestTypes().registry().get("candidate_evaluation")
    resources = resources_for(tmp_path / "vbs", VBS_DATASET_MIN_EXAMPLES="0")
    instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, ["candidate_evaluation"])
    catalog = resources["catalog"]
    rows = []
    for n in range(4):
        data = {"role_title": f"Cook {n}", "job_description": "Grill.", "candidate_summary": "Ok"}
        rows.append({**conquest(n), "type": "candidate_evaluation", "input_data": data,
                     "prompt": candidate.prompt(data), "prediction": '{"recommendation": "yes"}'})  # fmt: skip
    catalog.conquests.add(rows)
    for n, bias in enumerate(("none", "possible", "clear", None)):
        answers = {"recommendation": "yes", **({"bias_concern": bias} if bias else {})}
        annotate(catalog, rows[n]["id"], is_gold_star=True, answers=answers)
    result = dg.materialize(
        [curated_dataset], partition_key="candidate_evaluation", instance=instance,
        resources=resources,
    )  # fmt: skip
    metadata = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}  # fmt: skip
    assert metadata["excluded"] == 2 and metadata["train"] + metadata["eval"] == 2
    icl = lines(resources["bucket"], metadata["version"], L.ICL)
    assert all(line["output"] == {"prediction": '{"recommendation": "yes"}',
                                  "recommendation": "yes"} for line in icl)  # fmt: skip


def test_every_conquest_type_that_loads_gets_a_partition(tmp_path):
    from vbs_sensors.curation import conquest_type_partition_sensor

    resources = resources_for(tmp_path / "vbs")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        result = conquest_type_partition_sensor(context)
        (request,) = result.dynamic_partitions_requests
        assert sorted(request.partition_keys) == ["candidate_evaluation", "support_reply"]
        instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, list(request.partition_keys))
        again = conquest_type_partition_sensor(dg.build_sensor_context(instance=instance,
                                                                       resources=resources))  # fmt: skip
        assert isinstance(again, dg.SkipReason) and "2 conquest types" in again.skip_message
    broken = tmp_path / "types"
    broken.mkdir()
    (broken / "bad.yaml").write_text("id: bad\nname: [unclosed\n")
    resources = resources_for(tmp_path / "other", VBS_CONQUEST_TYPES_DIR=str(broken))
    with dg.instance_for_test() as instance:
        skipped = conquest_type_partition_sensor(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
        assert isinstance(skipped, dg.SkipReason) and "bad.yaml" in skipped.skip_message


def _gold(n: int, batch: str = "batch_dataset000") -> dict:
    row = conquest(n, batch=batch)
    return {"id": row["id"], "created_at": row["created_at"],
            "input_data": json.dumps(row["input_data"]), "prediction": row["prediction"],
            "is_gold_star": True, "rating": None, "feedback": None,
            "improvement_notes": None, "answers": None}  # fmt: skip


def test_a_prompt_keeps_its_side_as_the_dataset_grows():
    import polars as pl

    known: dict[str, str] = {}

    def sides(count: int) -> dict[str, str]:
        built = build_dataset(SUPPORT, pl.DataFrame([_gold(n) for n in range(count)]), 0.2, known)
        known.update(built.sides)  # recorded, as the catalog records them
        again = build_dataset(SUPPORT, pl.DataFrame([_gold(n) for n in range(count)]), 0.2, known)
        assert again.version == built.version  # deterministic, given what was recorded
        return {e.conquest_id: split for split in ("train", "eval")
                for e in getattr(built, split)}  # fmt: skip

    seen: dict[str, str] = {}
    for count in (1, 3, 20, 40, 60):
        now = sides(count)
        assert all(now[k] == side for k, side in seen.items()), count
        seen.update(now)
        # Held out at least max(1, round(fraction x prompts)) once there are two prompts.
        assert list(now.values()).count("eval") >= (max(1, round(0.2 * count)) if count > 1 else 0)
    assert list(seen.values()).count("eval") < 30


def test_every_dataset_of_two_prompts_or_more_holds_some_out():
    """The hash alone held out nothing 0.9^n of the time (12% at 20 prompts): now every set of
    prompts holds out at least max(1, round(fraction x prompts)), whatever their hashes."""
    import polars as pl

    short = []
    for trial in range(60):
        count = 2 + trial % 25
        batch = f"batch_split{trial:05d}"
        built = build_dataset(SUPPORT, pl.DataFrame([_gold(n, batch) for n in range(count)]), 0.1)
        needed = max(1, round(0.1 * count))
        if not needed <= len(built.eval) < count:
            short.append((count, len(built.eval)))
    assert short == []
    assert held_out(20, 0.1) == 2 and held_out(10, 0.1) == 1 and held_out(1, 0.1) == 0
    assert held_out(2, 0.9) == 1 and held_out(50, 0.0) == 0  # always one left to train on


def test_a_twenty_gold_dataset_builds_with_the_default_fraction(tmp_path, instance):
    """20 gold conquests at the default eval_fraction (0.1) build: 2 held out, checks pass."""
    resources = resources_for(tmp_path / "vbs")
    catalog = resources["catalog"]
    instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, [TYPE])
    rows = [conquest(n) for n in range(20)]
    catalog.conquests.add(rows)
    for row in rows:
        annotate(catalog, row["id"], is_gold_star=True)
    metadata, result = build(resources, instance)
    assert metadata["eval"] >= 2 and metadata["train"] + metadata["eval"] == 20
    assert all(checks_of(result).values()), checks_of(result)
    row = catalog.datasets.get(metadata["version"])
    assert failed_checks(row) == [] and set(row["checks"]) == set(checks_of(result))
    # Built again with nothing new: the same version, each prompt on its recorded side.
    again, _ = build(resources, instance)
    assert again["version"] == metadata["version"]
    assert len(catalog.datasets.sides(TYPE)) == 20


@pytest.mark.parametrize(
    "line, where",
    [
        ('{"messages": [{"role": "user", "content": "a"}]}', "messages"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}',
         "messages.1.role"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
         "messages.1.content"),
        ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
         "the last turn"),
        ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}',
         "messages.0.content"),
        ('{"messages": [], "extra": 1}', "messages"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]',
         "line"),
    ],
)  # fmt: skip
def test_chat_format_errors_name_the_field(line, where):
    with pytest.raises(ValueError, match=where):
        check_example(line)


def test_vbs_query_runs_sql_over_the_lake(curated, tmp_path):
    resources, instance = curated
    catalog = resources["catalog"]
    rows = [conquest(n) for n in range(4)]
    catalog.conquests.add(rows)
    annotate(catalog, rows[0]["id"], is_gold_star=True, rating=5)
    annotate(catalog, rows[1]["id"], rating=2)
    sql = (
        "SELECT c.type, count(*) AS conquests, count(a.conquest_id) AS annotated, "
        "count(*) FILTER (WHERE a.is_gold_star) AS gold FROM conquests c "
        "LEFT JOIN annotations a ON a.conquest_id = c.id GROUP BY c.type"
    )
    env = {"VBS_HOME": str(tmp_path / "vbs"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "query", sql, "--format", "json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [json.loads(x) for x in done.stdout.splitlines()] == [
        {"type": TYPE, "conquests": 4, "annotated": 2, "gold": 1}
    ]
    table = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "query", "SELECT count(*) AS n FROM results"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert table.returncode == 0 and "n" in table.stdout and "0" in table.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "query", "SELECT nope FROM conquests"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


CANDIDATES = [
    {
        "role_title": f"Barista {n}",
        "job_description": "Make espresso drinks; open the café at 6am.",
        "candidate_summary": f"{n + 1} years behind a busy bar; latte art ☕.",
        "years_experience": n + 1,
    }
    for n in range(4)
]


def test_vbs_datasets_build_through_the_running_dagster_and_the_api(platform, tmp_path):
    import httpx

    from tests.conftest import API_KEY, wait_for
    from tests.test_conquests import _tasks_of, platform_label_studio, vbs

    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CANDIDATES), encoding="utf-8")
    submitted = vbs(platform, "conquests", "submit", "candidate_evaluation", str(path),
                    "--max-tokens", "8", "--wait")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    catalog = platform.resources["catalog"]
    wait_for(lambda: len(catalog.conquests.of_batch(batch_id)) == 4, 60, "the conquests")
    ids = [r["id"] for r in catalog.conquests.of_batch(batch_id)]
    api = httpx.Client(
        base_url=platform.api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    # A curator stars the first in Label Studio; the API stars two more and rates one low.
    ls = platform_label_studio(platform)
    wait_for(lambda: _tasks_of(ls, catalog, "candidate_evaluation", batch_id), 120, "the tasks")
    project = catalog.label_studio.project("candidate_evaluation", ls.url)["project_id"]
    (task,) = [t for t in ls.tasks(project) if t["data"]["conquest_id"] == ids[0]]
    ls._call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [
        {"from_name": "is_gold_star", "to_name": "prediction", "type": "choices",
         "value": {"choices": ["gold"]}},
        {"from_name": "recommendation", "to_name": "prediction", "type": "choices",
         "value": {"choices": ["yes"]}},
    ]})  # fmt: skip
    answers = {"recommendation_correct": True, "recommendation": "yes"}
    for conquest_id in ids[1:3]:
        done = api.post(f"/conquests/{conquest_id}/annotate",
                        json={"isGoldStar": True, "answers": answers})  # fmt: skip
        assert done.status_code == 200, done.text
    api.post(f"/conquests/{ids[3]}/annotate", json={"rating": 1})
    wait_for(lambda: (catalog.conquests.annotation_of(ids[0]) or {}).get("source") == "label_studio", 90,
             "the sensor to bring the Label Studio star in")  # fmt: skip

    env = {**platform.env, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "vbs_cli.main", "datasets", "build", "--type",
               "candidate_evaluation", "--dagster-url", f"http://127.0.0.1:{platform.port}"]  # fmt: skip

    def datasets(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip

    # Three examples are fewer than the default bar of ten: the blocking check fails the run.
    refused = datasets("--eval-fraction", "0.5")
    assert refused.returncode == 1 and "blocking checks failed: min_examples" in refused.stderr
    line = json.loads(refused.stdout)
    assert line["run_status"] == "FAILURE" and line["train"] + line["eval"] == 3
    assert line["checks"]["min_examples"] is False
    # A version that failed its blocking checks is not trained on: 400, the check named.
    training = api.post(
        "/fine_tuning/jobs", json={"model": MODEL, "training_file": line["version"]}
    )
    assert training.status_code == 400, training.text
    assert "min_examples" in training.json()["error"]["message"]
    assert training.json()["error"]["param"] == "training_file"
    # Options out of range are refused before anything is launched.
    runs_before = len(platform.instance.get_run_records())
    for bad in (("--eval-fraction", "nan"), ("--eval-fraction", "2"), ("--eval-fraction", "-1"),
                ("--min-rating", "99"), ("--min-examples", "-5")):  # fmt: skip
        out = datasets(*bad)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (bad, out.stderr)
        assert bad[0] in out.stderr
    assert len(platform.instance.get_run_records()) == runs_before
    # Three builds of the same data at once: each reports its own run's build.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        three = list(pool.map(lambda _: datasets("--min-examples", "3", "--eval-fraction", "0.5"),
                              range(3)))  # fmt: skip
    assert [b.returncode for b in three] == [0, 0, 0], [b.stderr for b in three]
    outs = [json.loads(b.stdout) for b in three]
    assert len({o["run_id"] for o in outs}) == 3 and len({o["version"] for o in outs}) == 1
    built = datasets("--min-examples", "3", "--eval-fraction", "0.5")
    assert built.returncode == 0, built.stderr
    (out,) = [json.loads(x) for x in built.stdout.splitlines()]
    assert out["version"] == line["version"] and out["run_status"] == "SUCCESS"
    assert out["type"] == "candidate_evaluation" and out["eval"] >= 1
    version = out["version"]

    got = api.get(f"/datasets/{version}").json()
    assert got["counts"] == {"train": out["train"], "eval": out["eval"], "icl": out["icl"]}
    assert sorted(got["conquest_ids"]["train"] + got["conquest_ids"]["eval"]) == sorted(ids[:3])
    listed = api.get("/datasets", params={"type": "candidate_evaluation"}).json()
    assert listed["data"][0]["id"] == version and listed["data"][0]["conquest_ids"] is None
    assert api.get("/datasets/candidate_evaluation-0000000000000000").status_code == 404
    assert api.get("/datasets/../../etc").status_code == 404
    assert httpx.get(f"{platform.api_url}/datasets").status_code == 401
    examples = lines(platform.resources["bucket"], version, L.TRAIN)
    assert all("Barista" in e["messages"][1]["content"] for e in examples)

    # The running daemon's sensor gave every type its partition.
    wait_for(
        lambda: (
            {"candidate_evaluation", "support_reply"}
            <= set(platform.instance.get_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS))
        ),
        90,
        "the conquest type partitions",
    )
    # The asset's Dagster data version is the dataset version; its lineage reaches the batches.
    key = dg.AssetKey(L.CURATED_DATASET)
    event = platform.instance.get_latest_materialization_event(key)
    assert event.asset_materialization.tags["dagster/data_version"] == version
    query = vbs_query(env, f"SELECT count(*) AS n FROM results WHERE batch_id = '{batch_id}'")
    assert query == [{"n": 4}]


def vbs_query(env: dict[str, str], sql: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "query", sql, "--format", "json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(x) for x in done.stdout.splitlines()]
