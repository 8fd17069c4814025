"""``vbs doctor``: is this deployment able to work? One line per check, each failure with what
to do about it; exit status 1 when any check failed.

It only reads (a probe object written to the bucket and removed is the one exception): it never
migrates the catalog or Dagster's storage, never starts a process, and never prints a secret
(URLs are shown without their user and password).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vbs_resources.dagster_instance import open_instance
from vbs_resources.settings import Settings, redact_url

# A daemon whose last heartbeat is older than this is taken for dead (Dagster's daemons beat
# every 20 s).
HEARTBEAT_STALE_S = 120


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational (a GPU seen or not)
    detail: str
    fix: str = ""


def add_commands(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor", help="check the catalog, Dagster, the bucket, the model, the engine, "
        "Label Studio and the daemon; exit 1 if any check fails",
    )  # fmt: skip
    doctor.add_argument("--timeout", type=float, default=10.0, help="seconds per network check")


def run(args: argparse.Namespace, settings: Settings) -> int:
    failed = 0
    for check in checks(settings, args.timeout):
        mark = {True: "ok  ", False: "FAIL", None: "info"}[check.ok]
        line = f"{mark} {check.name}: {check.detail}"
        if check.ok is False:
            failed += 1
            line += f"\n     fix: {check.fix}"
        print(line, flush=True)
    print(f"vbs doctor: {'all checks passed' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


def checks(settings: Settings, timeout: float) -> Iterator[Check]:
    from vbs_resources.error_tracking import scrub, secret_values

    secrets = secret_values(settings)
    for probe in (catalog, dagster_storage, daemon, bucket, model, engine, gpu, label_studio):
        try:
            yield probe(settings, timeout)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check
            reason = scrub(_reason(exc), secrets)
            yield Check(probe.__name__.replace("_", " "), False, reason, _FIXES[probe])


def _reason(exc: Exception) -> str:
    """An exception in one line (the secrets of the settings are taken out by the caller)."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def catalog(settings: Settings, timeout: float) -> Check:
    import sqlalchemy as sa

    from vbs_resources import migrations

    url = settings.resolved_catalog_url
    shown = redact_url(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return Check("catalog", False, f"{shown} does not exist", "start `vbs serve` once")
    args = {"connect_timeout": int(timeout)} if url.startswith("postgresql") else {}
    engine = sa.create_engine(url, connect_args=args)
    try:
        with engine.connect() as conn:
            found = migrations.current(conn)
    finally:
        engine.dispose()
    head = migrations.head()
    if found != head:
        return Check(
            "catalog", False, f"{shown} is at revision {found or 'none'}, the code at {head}",
            "start `vbs serve` (it upgrades the catalog before anything else)",
        )  # fmt: skip
    return Check("catalog", True, f"{shown}, revision {head}")


def dagster_storage(settings: Settings, timeout: float) -> Check:
    import yaml

    written = yaml.safe_load((settings.dagster_home / "dagster.yaml").read_text()) or {}
    if settings.dagster_storage_url is not None and "postgres" not in (
        written.get("storage") or {}
    ):
        return Check(
            "dagster storage", False, "VBS_DAGSTER_STORAGE_URL is set, but the instance's "
            "dagster.yaml has no postgres storage (it was written without it)",
            "run `vbs migrate` (or `vbs serve`) with this setting",
        )  # fmt: skip
    with open_instance(settings) as instance:
        stale = []
        for name, storage in (
            ("runs", instance.run_storage),
            ("event log", instance.event_log_storage),
        ):
            found, head = storage.alembic_version()
            if found != head:
                stale.append(f"{name} at {found}, Dagster at {head}")
        kind = type(instance.run_storage).__name__.removesuffix("RunStorage")
    if stale:
        return Check("dagster storage", False, "; ".join(stale),
                     f"run `DAGSTER_HOME={settings.dagster_home} dagster instance migrate`")  # fmt: skip
    return Check("dagster storage", True, f"{kind}, migrated")


def daemon(settings: Settings, timeout: float) -> Check:
    with open_instance(settings) as instance:
        beats = instance.get_daemon_heartbeats()
        required = instance.get_required_daemon_types()
    now = time.time()
    late = sorted(
        name for name in required
        if name not in beats or now - beats[name].timestamp > HEARTBEAT_STALE_S
    )  # fmt: skip
    if late:
        ages = ", ".join(
            f"{name} ({int(now - beats[name].timestamp)} s ago)" if name in beats else
            f"{name} (never)" for name in late
        )  # fmt: skip
        return Check("daemon", False, f"no recent heartbeat from {ages}",
                     "start `vbs serve` (or dagster-daemon) and look at its log")  # fmt: skip
    oldest = max(now - beats[name].timestamp for name in required)
    return Check("daemon", True, f"{len(required)} daemons, last heartbeats within {oldest:.0f} s")


def bucket(settings: Settings, timeout: float) -> Check:
    from vbs_resources.bucket import Bucket

    store = Bucket(url=settings.resolved_bucket_url)
    shown = redact_url(settings.resolved_bucket_url) if "://" in store.url else store.url
    probe = f".doctor/{uuid.uuid4().hex}"
    data = uuid.uuid4().bytes
    store.write_bytes(probe, data)
    try:
        if store.read_bytes(probe) != data:
            return Check("bucket", False, f"{shown}: read back other bytes", "check the store")
    finally:
        store.remove(probe)
    return Check("bucket", True, f"{shown} is writable")


def model(settings: Settings, timeout: float) -> Check:
    from vbs_resources.model_store import default_model_dir

    folder = Path(settings.model or default_model_dir(settings.home))
    if not (folder / "config.json").exists():
        return Check("model", False, f"{folder} has no config.json",
                     "`make model` (or `vbs model prepare`), or point VBS_MODEL at a model folder")  # fmt: skip
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights:
        return Check("model", False, f"{folder} has no weights", "prepare the model again")
    return Check("model", True, f"{folder} ({len(weights)} weight file(s))")


def engine(settings: Settings, timeout: float) -> Check:
    if settings.engine == "server":
        import httpx

        url = settings.resolved_engine_url
        answer = httpx.get(f"{url}/health", timeout=timeout)
        if answer.status_code != 200:
            return Check("engine", False, f"{redact_url(url)}/health answered "
                         f"{answer.status_code}", "look at the engine server's log")  # fmt: skip
        return Check("engine", True, f"server {redact_url(url)} is healthy")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return Check("engine", False, "vLLM is not installed in this environment", "`make setup`")
    return Check("engine", True, "in-process vLLM is installed (loaded by each run)")


def gpu(settings: Settings, timeout: float) -> Check:
    from vbs_resources.engine.hardware import gpu_list, installed_vllm_build, torch_cuda_version

    smi = shutil.which("nvidia-smi")
    gpus = gpu_list(timeout)
    driver_cuda = None
    if smi is not None:
        table = subprocess.run([smi], capture_output=True, text=True, timeout=timeout).stdout
        found = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", table)
        driver_cuda = found.group(1) if found else None
    return gpu_report(
        installed_vllm_build(),
        gpus,
        driver_cuda,
        torch_cuda_version(),
        settings.cuda_visible_devices,
    )


def gpu_report(
    build: str | None,
    gpus: list[str],
    driver_cuda: str | None,
    torch_cuda: str | None,
    cuda_visible_devices: str | None,
) -> Check:
    """The GPU check from what was found: the installed vLLM build (``cpu``, ``cuda``), the
    GPUs ``nvidia-smi -L`` lists, the highest CUDA its driver supports, the CUDA torch was
    built for, and the ``CUDA_VISIBLE_DEVICES`` setting."""
    if build != "cuda":
        if gpus:
            return Check("gpu", None, f"{len(gpus)} GPU(s), but vLLM's CPU build is installed: "
                         "the engine runs on the CPU (`make setup EXTRA=gpu` builds the "
                         "environment for the GPUs)")  # fmt: skip
        return Check("gpu", None, "no NVIDIA GPU: vLLM's CPU build runs")
    if not gpus:
        return Check("gpu", False, "vLLM's CUDA build is installed, but nvidia-smi lists no GPU",
                     "install the NVIDIA driver, or `make setup EXTRA=cpu` for the CPU build")  # fmt: skip
    if cuda_visible_devices == "":
        return Check("gpu", False, "CUDA_VISIBLE_DEVICES is empty: every GPU is hidden from "
                     "vLLM's CUDA build", "unset CUDA_VISIBLE_DEVICES")  # fmt: skip
    fits = cuda_fits_driver(torch_cuda, driver_cuda)
    seen = f"{len(gpus)} GPU(s): {gpus[0]}; torch built for CUDA {torch_cuda}, driver up to {driver_cuda}"
    if fits is False:
        return Check("gpu", False, f"{seen}: the driver is too old for this torch",
                     f"upgrade the NVIDIA driver to one supporting CUDA {torch_cuda} or newer "
                     "(docs/gpu.md: choosing the torch build)")  # fmt: skip
    if fits is None:
        return Check("gpu", None, f"{seen}: runs through CUDA's minor version compatibility "
                     "(no PTX JIT); a driver for the same minor version is safer")  # fmt: skip
    return Check("gpu", True, seen)


def cuda_fits_driver(torch_cuda: str | None, driver_cuda: str | None) -> bool | None:
    """Whether torch's CUDA runtime runs on this driver: True when the driver supports that
    CUDA version; None within the same major version only (CUDA's minor version
    compatibility, which covers everything but PTX JIT); False for a newer major version, or
    when either is unknown (no CUDA torch, no driver version)."""
    if not torch_cuda or not driver_cuda:
        return False
    wanted = tuple(int(x) for x in torch_cuda.split(".")[:2])
    have = tuple(int(x) for x in driver_cuda.split(".")[:2])
    if wanted <= have:
        return True
    return None if wanted[0] == have[0] else False


def label_studio(settings: Settings, timeout: float) -> Check:
    from vbs_resources.curation.label_studio import LabelStudio, LabelStudioError

    token = settings.label_studio_token
    client = LabelStudio(
        url=settings.resolved_label_studio_url,
        token=token.get_secret_value() if token is not None else None,
        token_file=str(settings.label_studio_home / "token"),
        timeout_s=timeout,
    )
    shown = redact_url(settings.resolved_label_studio_url)
    if not client.healthy():
        return Check("label studio", False, f"{shown} does not answer",
                     "start `vbs serve` (it starts Label Studio), or set VBS_LABEL_STUDIO_URL")  # fmt: skip
    try:
        user = client.whoami()
    except LabelStudioError as exc:
        return Check("label studio", False, f"{shown} refused the token ({exc.status})",
                     "set VBS_LABEL_STUDIO_TOKEN to a valid API token")  # fmt: skip
    return Check("label studio", True, f"{shown}, token of {user.get('username', '?')}")


_FIXES: dict[Callable, str] = {
    catalog: "check VBS_CATALOG_URL and that the database server is up",
    dagster_storage: "check VBS_DAGSTER_STORAGE_URL (or VBS_DAGSTER_YAML) and start `vbs serve` "
    "once",
    daemon: "start `vbs serve`",
    bucket: "check VBS_BUCKET_URL and its credentials (AWS_* for s3://)",
    model: "`make model`, or point VBS_MODEL at a model folder",
    engine: "check VBS_ENGINE_URL, or start the engine (`vbs engine serve`)",
    gpu: "",
    label_studio: "check VBS_LABEL_STUDIO_URL and VBS_LABEL_STUDIO_TOKEN",
}
