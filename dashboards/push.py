"""Create or update the moxco dashboards, their folder and their datasources in a live Grafana.

Uses the Grafana HTTP API through ``grafana-client`` with a service-account token (Bearer):

* ``GET /api/health``: is this Grafana at all (no auth needed);
* ``GET /api/folders``, ``POST /api/folders``: the folder (default ``moxco``);
* ``GET /api/datasources/uid/{uid}``, ``POST /api/datasources``, ``PUT /api/datasources/uid/{uid}``:
  the Prometheus (``moxco-prometheus``) and PostgreSQL (``moxco-postgres``) datasources, when their
  URLs are given;
* ``GET /api/dashboards/uid/{uid}``, ``POST /api/dashboards/db``: the dashboards, built from code
  (``moxco.dashboards.build``), not read from files.

Idempotent: what Grafana already holds is compared with what would be sent, and nothing is written
when they agree (reported ``unchanged``). A dashboard update sends the version it read, so a
concurrent save in Grafana is a version conflict (HTTP 412), reported, never silently overwritten;
``overwrite=True`` forces it. Secrets (the PostgreSQL password) cannot be read back from Grafana:
they are sent on creation, or when ``update_secrets=True``.

Every failure is a :class:`PushError` whose message says what went wrong and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlparse

import niquests
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaServerError, GrafanaTimeoutError

from moxco.dashboards import build

__all__ = ["PushError", "Outcome", "prometheus_datasource", "postgres_datasource", "push", "is_subset"]

PUSH_MESSAGE = "moxco dashboards push"


class PushError(RuntimeError):
    """A push failed; the message is meant for the user as it is."""


@dataclass(frozen=True)
class Outcome:
    """What push did to one object: ``created``, ``updated`` or ``unchanged``."""

    kind: str  # folder | datasource | dashboard
    name: str
    action: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.action}"


# --- datasource payloads -------------------------------------------------------------------------


def prometheus_datasource(url: str) -> Dict[str, Any]:
    """The ``moxco-prometheus`` datasource (server-side access, POST queries)."""
    return {
        "uid": build.PROMETHEUS_UID,
        "name": "moxco Prometheus",
        "type": build.PROMETHEUS_TYPE,
        "access": "proxy",
        "url": url.rstrip("/"),
        "isDefault": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
    }


def postgres_datasource(url: str) -> Dict[str, Any]:
    """The ``moxco-postgres`` datasource from ``postgresql://user:password@host:port/db?sslmode=…``
    (the collector's store; a read-only role is enough)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.split("+", 1)[0]  # postgresql+psycopg://… (a store URL) is the same server
    if scheme not in ("postgresql", "postgres") or not parsed.hostname or not parsed.path.strip("/"):
        raise PushError(f"--store must be the PostgreSQL store as Grafana reaches it, "
                        f"postgresql://user:password@host:5432/database, got {url!r}")
    sslmode = parse_qs(parsed.query).get("sslmode", ["disable"])[0]
    payload: Dict[str, Any] = {
        "uid": build.POSTGRES_UID,
        "name": "moxco PostgreSQL",
        "type": build.POSTGRES_TYPE,
        "access": "proxy",
        "url": f"{parsed.hostname}:{parsed.port or 5432}",
        "user": unquote(parsed.username or ""),
        "isDefault": False,
        "jsonData": {"database": unquote(parsed.path.strip("/")), "sslmode": sslmode, "postgresVersion": 1500,
                     "timescaledb": False},
    }
    if parsed.password:
        payload["secureJsonData"] = {"password": unquote(parsed.password)}
    return payload


# --- comparison ----------------------------------------------------------------------------------


def is_subset(wanted: Any, stored: Any) -> bool:
    """Whether ``stored`` holds everything in ``wanted``: dict keys recursively (Grafana may add
    keys of its own), lists element by element with equal length, other values equal."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(k in stored and is_subset(v, stored[k]) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(stored, list) and len(wanted) == len(stored)
                and all(is_subset(w, s) for w, s in zip(wanted, stored)))
    if isinstance(wanted, bool) or isinstance(stored, bool):
        return wanted is stored
    return wanted == stored


# --- the client ----------------------------------------------------------------------------------


class _Grafana:
    """``GrafanaApi`` plus error translation."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise PushError(f"--grafana must be an http(s) URL such as http://localhost:3000, got {url!r}")
        if not token:
            raise PushError("no Grafana token: pass --grafana-token or set MOXCO_GRAFANA_TOKEN (a service-account token)")
        # grafana-client joins the path prefix and "api" without a separator: keep a trailing slash.
        base = url if parsed.path.endswith("/") else url + "/"
        self.url = url
        self.api = GrafanaApi.from_url(base, credential=token, timeout=timeout)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False) -> Any:
        """Run one API call; ``missing_ok``: a 404 returns None instead of failing."""
        try:
            return fn(*args)
        except GrafanaClientError as exc:
            status = exc.status_code
            detail = _message(exc.response)
            if status == 404 and missing_ok:
                return None
            if status == 401:
                raise PushError(f"Grafana at {self.url} rejected the token (401 Unauthorized) while trying to "
                                f"{what}: check --grafana-token (a service-account token, glsa_…), and that it has not "
                                "expired or been revoked") from None
            if status == 403:
                raise PushError(f"the token may not {what} (403 Forbidden: {detail}): give the service account "
                                "the Editor role for dashboards and folders, Admin for datasources") from None
            if status == 412:
                raise PushError(f"version conflict while trying to {what} (412 {detail}): it was changed in "
                                "Grafana while pushing; run push again, or pass --overwrite to replace it") from None
            if status == 409:
                raise PushError(f"conflict while trying to {what} (409 {detail}): an object with the same name "
                                "but another uid exists in Grafana; rename or delete it, then push again") from None
            raise PushError(f"Grafana refused to {what}: HTTP {status} {detail}") from None
        except GrafanaTimeoutError as exc:
            raise PushError(f"Grafana at {self.url} did not answer in time while trying to {what}: {exc}") from None
        except GrafanaServerError as exc:
            raise PushError(f"Grafana failed to {what}: HTTP {exc.status_code} {_message(exc.response)}") from None
        except GrafanaException as exc:
            raise PushError(f"cannot {what} at {self.url}: {exc}") from None
        except niquests.exceptions.ConnectionError as exc:
            text = str(exc).lower()
            reason = ("connection refused" if "refused" in text else
                      "host name not found" if "resolve" in text or "name or service" in text else _short(exc))
            raise PushError(f"cannot connect to Grafana at {self.url} ({reason}): is the URL right and "
                            "Grafana running?") from None
        except niquests.exceptions.RequestException as exc:
            raise PushError(f"cannot {what} at {self.url}: {_short(exc)}") from None
        except ValueError as exc:  # a 2xx whose body is not JSON: not Grafana's API
            raise PushError(f"{self.url} does not look like Grafana: {what} returned a non-JSON answer "
                            f"({_short(exc)})") from None


def _message(response: Any) -> str:
    if isinstance(response, dict):
        return str(response.get("message") or response.get("status") or response)
    return str(response)[:200]


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"


# --- steps ---------------------------------------------------------------------------------------


def _check_grafana(g: _Grafana) -> str:
    """``GET /api/health``: Grafana answers ``{"database": "ok", "version": …}``; returns the version."""
    try:
        health = g.call("read /api/health", g.api.client.GET, "/health")
    except PushError as exc:
        if "HTTP 404" in str(exc) or "non-JSON" in str(exc):
            raise PushError(f"{g.url} does not look like Grafana: GET /api/health is not Grafana's health "
                            "endpoint (is this the Grafana URL, not Prometheus or the collector?)") from None
        raise
    if not isinstance(health, dict) or "database" not in health:
        raise PushError(f"{g.url} does not look like Grafana: GET /api/health answered {str(health)[:120]!r}")
    if health.get("database") != "ok":
        raise PushError(f"Grafana at {g.url} reports its database as {health.get('database')!r}; try again later")
    return str(health.get("version", "unknown"))


def _folder(g: _Grafana, title: str) -> tuple[str, Outcome]:
    folders = g.call("list folders", g.api.folder.get_all_folders) or []
    uid = _slug(title)
    for folder in folders:
        if folder.get("uid") == uid or folder.get("title") == title:
            return folder["uid"], Outcome("folder", title, "unchanged")
    created = g.call(f"create folder {title!r}", g.api.folder.create_folder, title, uid)
    return created.get("uid", uid), Outcome("folder", title, "created")


def _slug(title: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in title.lower()).strip("-")
    return (slug or "moxco")[:40]


def _datasource(g: _Grafana, wanted: Dict[str, Any], update_secrets: bool) -> Outcome:
    uid = wanted["uid"]
    stored = g.call(f"read datasource {uid}", g.api.datasource.get_datasource_by_uid, uid, missing_ok=True)
    if stored is None:
        g.call(f"create datasource {uid}", g.api.datasource.create_datasource, wanted)
        return Outcome("datasource", uid, "created")
    plain = {k: v for k, v in wanted.items() if k != "secureJsonData"}
    secrets = wanted.get("secureJsonData") or {}
    secrets_set = all((stored.get("secureJsonFields") or {}).get(k) for k in secrets)
    if is_subset(plain, stored) and secrets_set and not (update_secrets and secrets):
        return Outcome("datasource", uid, "unchanged")
    body = dict(plain)
    if secrets and (update_secrets or not secrets_set):
        body["secureJsonData"] = secrets
    if "version" in stored:
        body["version"] = stored["version"]
    g.call(f"update datasource {uid}", g.api.datasource.update_datasource_by_uid, uid, body)
    return Outcome("datasource", uid, "updated")


def _dashboard(g: _Grafana, model: Dict[str, Any], folder_uid: str, overwrite: bool) -> Outcome:
    uid = model["uid"]
    stored = g.call(f"read dashboard {uid}", g.api.dashboard.get_dashboard, uid, missing_ok=True)
    body: Dict[str, Any] = {"dashboard": dict(model), "folderUid": folder_uid, "message": PUSH_MESSAGE,
                            "overwrite": overwrite}
    if stored is None:
        body["dashboard"]["id"] = None
        g.call(f"create dashboard {uid}", g.api.dashboard.update_dashboard, body)
        return Outcome("dashboard", uid, "created")
    current = stored.get("dashboard") or {}
    meta = stored.get("meta") or {}
    if is_subset(model, current) and meta.get("folderUid", folder_uid) == folder_uid:
        return Outcome("dashboard", uid, "unchanged")
    if meta.get("provisioned"):
        raise PushError(f"dashboard {uid} is provisioned from files in that Grafana and cannot be changed "
                        "through the API: update the files (dashboards/json) there instead")
    body["dashboard"]["id"] = current.get("id")
    body["dashboard"]["version"] = current.get("version")
    g.call(f"update dashboard {uid}", g.api.dashboard.update_dashboard, body)
    return Outcome("dashboard", uid, "updated")


def push(grafana_url: str, token: str, *, folder: str = "moxco", prometheus_url: Optional[str] = None,
         postgres_url: Optional[str] = None, overwrite: bool = False, update_secrets: bool = False,
         timeout: float = 10.0, dashboards: Optional[List[Dict[str, Any]]] = None) -> List[Outcome]:
    """Push the folder, the datasources whose URLs are given, and the dashboards; returns what was
    done to each, in that order. Raises :class:`PushError`."""
    g = _Grafana(grafana_url, token, timeout)
    datasources = []
    if prometheus_url:
        datasources.append(prometheus_datasource(prometheus_url))
    if postgres_url:
        datasources.append(postgres_datasource(postgres_url))
    if dashboards is None:
        dashboards = [build.to_dict(factory()) for factory in build.DASHBOARDS.values()]

    _check_grafana(g)
    folder_uid, folder_outcome = _folder(g, folder)
    outcomes = [folder_outcome]
    outcomes += [_datasource(g, ds, update_secrets) for ds in datasources]
    outcomes += [_dashboard(g, model, folder_uid, overwrite) for model in dashboards]
    return outcomes


def missing_datasources(grafana_url: str, token: str, timeout: float = 10.0) -> List[str]:
    """The dashboards' datasource uids that the Grafana does not have (a warning after a push
    without ``--prometheus-url``/``--store``)."""
    g = _Grafana(grafana_url, token, timeout)
    missing = []
    for uid in (build.PROMETHEUS_UID, build.POSTGRES_UID):
        if g.call(f"read datasource {uid}", g.api.datasource.get_datasource_by_uid, uid, missing_ok=True) is None:
            missing.append(uid)
    return missing
