"""`vbs doctor` on a healthy platform (the shared one: Label Studio, a live daemon)
and on the same settings with each part broken in turn: the broken part fails with its fix
named, the others still pass, and no secret is printed."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa

from tests.conftest import free_port
from vbs_cli.doctor import checks
from vbs_resources import migrations
from vbs_resources.settings import load_settings

PASSWORD = "pw-Doctor-99"
PARTS = ("catalog", "dagster storage", "daemon", "bucket", "model", "engine", "label studio")


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "doctor", "--timeout", "5"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def results(env: dict[str, str]) -> dict[str, tuple[bool | None, str]]:
    settings = load_settings({k: v for k, v in env.items() if k.startswith(("VBS_", "CUDA"))})
    return {c.name: (c.ok, f"{c.detail} | {c.fix}") for c in checks(settings, 5)}


def test_a_healthy_platform_passes_every_check(platform):
    done = doctor(platform.process.env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for part in PARTS:
        assert any(line.startswith(f"ok   {part}: ") for line in lines), (part, done.stdout)
    assert any(line.startswith("info gpu: ") for line in lines)
    assert "revision" in done.stdout and "daemons" in done.stdout
    token = platform.process.env["VBS_LABEL_STUDIO_TOKEN"]
    assert token not in done.stdout and "FAIL" not in done.stdout


def _broken(platform, postgres, tmp_path) -> dict[str, dict[str, str]]:
    old = postgres.database("old")
    engine = sa.create_engine(old)
    migrations.upgrade(engine, "0005")
    engine.dispose()
    fresh = tmp_path / "fresh"
    catalog = f"sqlite:///{platform.home / 'catalog.db'}"
    (tmp_path / "a-file").write_text("")
    return {
        "catalog": {
            "VBS_CATALOG_URL": postgres.url("no_such_database").replace("vbs@", f"vbs:{PASSWORD}@")
        },
        "catalog-old": {"VBS_CATALOG_URL": old},
        # Instances of their own (written first, in homes of their own, with the platform's
        # catalog): Dagster's database unreachable, and a daemon that never ran.
        "dagster storage": {
            "VBS_HOME": str(tmp_path / "unreachable"),
            "VBS_CATALOG_URL": catalog,
            "VBS_DAGSTER_STORAGE_URL": postgres.url("no_such_database").replace(
                "vbs@", f"vbs:{PASSWORD}@"
            ),
        },
        # The setting names Postgres; the platform's dagster.yaml was written without it.
        "dagster storage-not-written": {"VBS_DAGSTER_STORAGE_URL": postgres.database("unused")},
        "daemon": {
            "VBS_HOME": str(fresh),
            "VBS_CATALOG_URL": catalog,
            "VBS_DAGSTER_STORAGE_URL": postgres.database("idle"),
        },
        "bucket": {"VBS_BUCKET_URL": str(tmp_path / "a-file" / "bucket")},
        "model": {"VBS_MODEL": str(tmp_path / "no-model")},
        "engine": {"VBS_ENGINE": "server", "VBS_ENGINE_URL": f"http://127.0.0.1:{free_port()}"},
        "label studio": {"VBS_LABEL_STUDIO_TOKEN": "not-the-token-0123"},
        "label studio-down": {"VBS_LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}"},
    }


def test_each_part_broken_fails_alone_with_its_fix(platform, postgres, tmp_path):
    from vbs_resources.dagster_instance import write_instance

    cases = _broken(platform, postgres, tmp_path)
    for case, change in cases.items():
        part = case.split("-")[0]
        env = {**platform.process.env, **change}
        if case in ("daemon", "dagster storage"):
            write_instance(load_settings({k: v for k, v in env.items() if k.startswith("VBS_")}))
        found = results(env)
        ok, text = found[part]
        assert ok is False, (case, found)
        assert " | " in text and text.split(" | ")[1], (case, text)  # a fix is named
        others = {name for name, (passed, _) in found.items() if passed is False} - {part}
        if part in ("dagster storage", "daemon"):  # one storage: both say so
            others -= {"dagster storage", "daemon"}
        assert not others, (case, found)
        assert "not-the-token-0123" not in str(found) and PASSWORD not in str(found)
    # The command says which, and exits 1.
    done = doctor({**platform.process.env, **cases["model"]})
    assert done.returncode == 1
    assert "FAIL model: " in done.stdout and "fix: `make model`" in done.stdout
    assert done.stdout.strip().endswith("vbs doctor: 1 failed")
