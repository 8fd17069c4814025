"""Label Studio: the local server ``vbs serve`` starts, and the resource that talks to it.

The resource speaks Label Studio's REST API with httpx, a handful of calls (projects, task
import, tasks). Label Studio's own SDK (``label-studio-sdk`` 2.1) pins ``opencv-python-headless``
4.12, which forces numpy below 2.3 into the environment vLLM runs in. Label Studio itself runs in
a virtual environment of its own (``.venv-label-studio``, made by ``make setup``).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

ADMIN_USERNAME = "admin@vbs.local"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class LabelStudioError(RuntimeError):
    """Label Studio refused a call (the message is its answer; ``status`` its HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer (down, starting, or an error on its side): try later."""


def _secret_file(path: Path, nbytes: int) -> str:
    """The secret kept in ``path`` (mode 600), made once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        value = secrets.token_hex(nbytes)
        fh.write(value + "\n")
    return value


def local_credentials(home: Path) -> tuple[str, str]:
    """(API token, admin password) of the local Label Studio under ``home``, made on first use:
    ``home/token`` and ``home/password``, both mode 600."""
    return _secret_file(home / "token", 20), _secret_file(home / "password", 16)


def label_studio_command(
    home: Path, host: str, port: int, token: str | None, executable: Path | None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment additions that start the local Label Studio: data,
    ``HOME`` and caches under ``home``, an admin user with a known token, loopback only."""
    made_token, password = local_credentials(home)
    binary = executable or PROJECT_ROOT / ".venv-label-studio" / "bin" / "label-studio"
    command = [str(binary), "start", "--no-browser", "--internal-host", host, "--port", str(port)]
    (home / "user").mkdir(parents=True, exist_ok=True)
    env = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(home / "data"),
        "HOME": str(home / "user"),
        "XDG_CACHE_HOME": str(home / "user" / ".cache"),
        "XDG_CONFIG_HOME": str(home / "user" / ".config"),
        "LABEL_STUDIO_USERNAME": ADMIN_USERNAME,
        "LABEL_STUDIO_PASSWORD": password,
        # In the environment, not on the command line, where `ps` would show it.
        "LABEL_STUDIO_USER_TOKEN": token or made_token,
        # Without it on the first start, the fixed token above is refused (401).
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }
    return command, env


class LabelStudio(dg.ConfigurableResource):
    """Label Studio's REST API at ``url``, with ``token`` (or the one in ``token_file``)."""

    url: str
    token: str | None = None
    token_file: str | None = None
    timeout_s: float = 30.0

    _http: Any = PrivateAttr(default=None)

    def _client(self) -> Any:
        import httpx

        if self._http is None:
            token = self.token
            if token is None and self.token_file:
                try:
                    token = Path(self.token_file).read_text().strip()
                except OSError:
                    raise LabelStudioUnavailable(
                        f"no Label Studio token: set VBS_LABEL_STUDIO_TOKEN, or start the "
                        f"local one (`vbs serve`), which makes {self.token_file}"
                    ) from None
            self._http = httpx.Client(
                base_url=self.url.rstrip("/"),
                headers={"Authorization": f"Token {token}"},
                timeout=self.timeout_s,
                follow_redirects=False,
            )
        return self._http

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._client().request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LabelStudioUnavailable(f"Label Studio at {self.url}: {exc}") from None
        if response.status_code >= 500:
            raise LabelStudioUnavailable(
                f"Label Studio at {self.url}: {method} {path} answered {response.status_code}"
            )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio refused {method} {path} ({response.status_code}): "
                f"{response.text[:500]}",
                response.status_code,
            )
        return response.json() if response.content else None

    def healthy(self) -> bool:
        """Label Studio answers (``/health`` needs no token)."""
        try:
            self._call("GET", "/health")
        except LabelStudioError:
            return False
        return True

    def whoami(self) -> dict[str, Any]:
        return self._call("GET", "/api/current-user/whoami")

    def create_project(self, title: str, label_config: str, description: str = "") -> int:
        body = {"title": title, "label_config": label_config, "description": description}
        return int(self._call("POST", "/api/projects", json=body)["id"])

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self._call("PATCH", f"/api/projects/{project_id}", json=fields)

    def get_project(self, project_id: int) -> dict[str, Any] | None:
        try:
            return self._call("GET", f"/api/projects/{project_id}")
        except LabelStudioError as exc:
            if exc.status != 404:
                raise
            return None

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Create one task per ``{"data": ...}``; their ids, in order."""
        answer = self._call(
            "POST",
            f"/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            json=tasks,
        )
        return [int(i) for i in answer.get("task_ids", [])]

    def tasks(
        self, project_id: int, updated_after: str | None = None, page_size: int = 100
    ) -> list[dict[str, Any]]:
        """Every task of a project, with its annotations; with ``updated_after`` (Label
        Studio's time format, microseconds and ``Z``), only those whose ``updated_at`` (moved by
        new and edited annotations) is later."""
        found: list[dict[str, Any]] = []
        page = 1
        query = None
        if updated_after is not None:
            item = {"filter": "filter:tasks:updated_at", "operator": "greater",
                    "type": "Datetime", "value": updated_after}  # fmt: skip
            query = json.dumps({"filters": {"conjunction": "and", "items": [item]}})
        while True:
            params = {"project": project_id, "fields": "all", "page": page, "page_size": page_size}
            if query is not None:
                params["query"] = query
            try:
                answer = self._call("GET", "/api/tasks", params=params)
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return found
                raise
            batch = answer.get("tasks", []) if isinstance(answer, dict) else answer
            found += batch
            if len(batch) < page_size:
                return found
            page += 1
