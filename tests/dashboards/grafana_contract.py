"""A contract server for the part of Grafana's HTTP API that ``moxco dashboards push`` uses.

It implements, in memory and from Grafana's HTTP API documentation (developers/http_api:
dashboard, folder, data_source, other → health):

* ``GET /api/health`` (no auth): ``{"commit", "database": "ok", "version"}``.
* ``GET /api/search?query=&type=dash-db|dash-folder``: hits ``{id, uid, title, url, type, tags,
  folderUid, folderTitle}``.
* ``GET /api/folders``: ``[{id, uid, title}]``; ``GET /api/folders/{uid}`` (404 when unknown);
  ``POST /api/folders {uid?, title}`` → the folder; 409 when the uid or title exists.
* ``GET /api/dashboards/uid/{uid}`` → ``{"dashboard": {…, id, uid, version}, "meta": {…}}`` or 404
  ``{"message": "Dashboard not found"}``.
* ``POST /api/dashboards/db {dashboard, folderUid, overwrite, message}`` → ``{id, uid, url,
  status: "success", version, slug}``. Without ``overwrite``: a dashboard whose uid exists with
  another ``version`` is 412 ``{"status": "version-mismatch"}``; a new uid whose title exists in the
  folder is 412 ``{"status": "name-exists"}``. An unknown ``folderUid`` is 400. The version
  increments by one per save.
* ``GET /api/datasources``; ``POST /api/datasources`` (409 on an existing name or uid) →
  ``{"datasource", "id", "message": "Datasource added", "name"}``; ``GET /api/datasources/uid/{uid}``
  (404 when unknown; secrets never returned, only ``secureJsonFields``);
  ``PUT /api/datasources/uid/{uid}`` (409 when the body's ``version`` is stale; secrets not sent
  are kept) → ``{"datasource", "id", "message": "Datasource updated", "name"}``.
* Auth: ``Authorization: Bearer <service-account token>``; a missing or unknown token is 401
  ``{"message": "Unauthorized"}``; a Viewer writing, or an Editor writing datasources, is 403
  ``{"message": "Access denied"}``.

``requests`` records every request (method, path, status) so tests can count the writes.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse

ROLES = ("Viewer", "Editor", "Admin")


class GrafanaState:
    """The in-memory Grafana: folders, dashboards, datasources, and the request log."""

    def __init__(self, tokens: Dict[str, str]) -> None:
        self.tokens = dict(tokens)  # token -> role
        self.folders: Dict[str, Dict[str, Any]] = {}
        self.dashboards: Dict[str, Dict[str, Any]] = {}  # uid -> {"dashboard", "folderUid", "provisioned"}
        self.datasources: Dict[str, Dict[str, Any]] = {}  # uid -> public fields
        self.secrets: Dict[str, Dict[str, str]] = {}  # uid -> secureJsonData
        self.requests: List[Tuple[str, str, int]] = []
        self.next_id = 1
        self.lock = threading.Lock()

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def writes(self) -> List[Tuple[str, str, int]]:
        """Requests that change state (POST/PUT/DELETE)."""
        return [r for r in self.requests if r[0] in ("POST", "PUT", "DELETE")]


def _slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


class _Handler(BaseHTTPRequestHandler):
    server_version = "grafana-contract/1.0"
    state: GrafanaState  # set on the class built per server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing --------------------------------------------------------------------------------

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        # logged before the answer leaves: a client that has its response must see its request logged
        self.state.requests.append((self.command, urlparse(self.path).path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Optional[Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return None

    def _role(self) -> Optional[str]:
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Bearer "):
            return None
        return self.state.tokens.get(header[len("Bearer "):])

    def _dispatch(self) -> None:
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        if not path.startswith("/api/"):
            return self._send(404, {"message": "Not found"})
        if path == "/api/health" and self.command == "GET":
            return self._send(200, {"commit": "contract", "database": "ok", "version": "11.3.0"})
        role = self._role()
        if role is None:
            return self._send(401, {"message": "Unauthorized"})
        body = self._body() if self.command in ("POST", "PUT") else None
        if self.command in ("POST", "PUT") and not isinstance(body, dict):
            return self._send(400, {"message": "bad request data"})
        with self.state.lock:
            for method, pattern, handler, need in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and method == self.command:
                    if ROLES.index(role) < ROLES.index(need):
                        return self._send(403, {"message": "Access denied"})
                    status, payload = handler(self.state, *[unquote(g) for g in match.groups()],
                                              body=body, query=query)
                    return self._send(status, payload)
        return self._send(404, {"message": "Not found"})

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch


# --- routes ----------------------------------------------------------------------------------------


def search(state: GrafanaState, *, body, query):
    text = (query.get("query") or [""])[0].lower()
    kind = (query.get("type") or [""])[0]
    hits = []
    if kind in ("", "dash-folder"):
        for f in state.folders.values():
            if text in f["title"].lower():
                hits.append({"id": f["id"], "uid": f["uid"], "title": f["title"], "url": f["url"],
                             "type": "dash-folder", "tags": []})
    if kind in ("", "dash-db"):
        for uid, entry in state.dashboards.items():
            d = entry["dashboard"]
            if text in d["title"].lower():
                folder = state.folders.get(entry["folderUid"] or "")
                hits.append({"id": d["id"], "uid": uid, "title": d["title"], "url": f"/d/{uid}/{_slugify(d['title'])}",
                             "type": "dash-db", "tags": d.get("tags") or [],
                             "folderUid": entry["folderUid"], "folderTitle": folder["title"] if folder else ""})
    return 200, hits


def list_folders(state: GrafanaState, *, body, query):
    return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in state.folders.values()]


def get_folder(state: GrafanaState, uid: str, *, body, query):
    folder = state.folders.get(uid)
    return (200, folder) if folder else (404, {"message": "folder not found", "status": "not-found"})


def create_folder(state: GrafanaState, *, body, query):
    title = body.get("title")
    if not isinstance(title, str) or not title:
        return 400, {"message": "folder title cannot be empty"}
    uid = body.get("uid") or f"f{state.next_id}"
    if uid in state.folders or any(f["title"] == title for f in state.folders.values()):
        return 409, {"message": "a folder with the same name already exists"}
    folder = {"id": state.new_id(), "uid": uid, "title": title, "url": f"/dashboards/f/{uid}/{_slugify(title)}",
              "version": 1, "hasAcl": False, "canSave": True, "canEdit": True, "canAdmin": True}
    state.folders[uid] = folder
    return 200, folder


def get_dashboard(state: GrafanaState, uid: str, *, body, query):
    entry = state.dashboards.get(uid)
    if entry is None:
        return 404, {"message": "Dashboard not found"}
    d = entry["dashboard"]
    folder = state.folders.get(entry["folderUid"] or "")
    meta = {"type": "db", "canSave": True, "canEdit": True, "slug": _slugify(d["title"]),
            "url": f"/d/{uid}/{_slugify(d['title'])}", "version": d["version"], "provisioned": entry["provisioned"],
            "folderUid": entry["folderUid"] or "", "folderTitle": folder["title"] if folder else "General",
            "folderId": folder["id"] if folder else 0}
    return 200, {"dashboard": copy.deepcopy(d), "meta": meta}


def save_dashboard(state: GrafanaState, *, body, query):
    d = body.get("dashboard")
    if not isinstance(d, dict) or not isinstance(d.get("title"), str) or not d["title"].strip():
        return 400, {"message": "Dashboard title cannot be empty", "status": "empty-name"}
    folder_uid = body.get("folderUid") or ""
    if folder_uid and folder_uid not in state.folders:
        return 400, {"message": "folder not found", "status": "not-found"}
    overwrite = bool(body.get("overwrite"))
    uid = d.get("uid") or f"d{state.next_id}"
    existing = state.dashboards.get(uid)
    if existing is not None:
        if existing["provisioned"]:
            return 400, {"message": "Cannot save provisioned dashboard", "status": "provisioned"}
        if not overwrite and d.get("version") != existing["dashboard"]["version"]:
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        ident, version = existing["dashboard"]["id"], existing["dashboard"]["version"] + 1
    else:
        if d.get("id") is not None:
            return 404, {"message": "Dashboard not found", "status": "not-found"}
        clash = [u for u, e in state.dashboards.items()
                 if e["dashboard"]["title"] == d["title"] and (e["folderUid"] or "") == folder_uid]
        if clash and not overwrite:
            return 412, {"message": "A dashboard with the same name in the folder already exists",
                         "status": "name-exists"}
        ident, version = state.new_id(), 1
    stored = copy.deepcopy(d)
    stored.update({"id": ident, "uid": uid, "version": version})
    state.dashboards[uid] = {"dashboard": stored, "folderUid": folder_uid, "provisioned": False}
    slug = _slugify(d["title"])
    return 200, {"id": ident, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success", "version": version,
                 "slug": slug}


def _public(state: GrafanaState, uid: str) -> Dict[str, Any]:
    ds = copy.deepcopy(state.datasources[uid])
    ds["secureJsonFields"] = {k: True for k in state.secrets.get(uid, {})}
    return ds


def list_datasources(state: GrafanaState, *, body, query):
    return 200, [_public(state, uid) for uid in state.datasources]


def get_datasource(state: GrafanaState, uid: str, *, body, query):
    if uid not in state.datasources:
        return 404, {"message": "Data source not found"}
    return 200, _public(state, uid)


_DS_FIELDS = ("name", "type", "access", "url", "user", "database", "basicAuth", "basicAuthUser",
              "withCredentials", "isDefault", "jsonData")


def create_datasource(state: GrafanaState, *, body, query):
    if not body.get("name") or not body.get("type"):
        return 400, {"message": "Required fields name and type"}
    uid = body.get("uid") or f"ds{state.next_id}"
    if uid in state.datasources or any(d["name"] == body["name"] for d in state.datasources.values()):
        return 409, {"message": "data source with the same name already exists"}
    ds = {"id": state.new_id(), "uid": uid, "orgId": 1, "readOnly": False, "version": 1,
          "access": "proxy", "url": "", "user": "", "database": "", "basicAuth": False, "isDefault": False,
          "jsonData": {}}
    ds.update({k: copy.deepcopy(body[k]) for k in _DS_FIELDS if k in body})
    state.datasources[uid] = ds
    state.secrets[uid] = dict(body.get("secureJsonData") or {})
    return 200, {"datasource": _public(state, uid), "id": ds["id"], "message": "Datasource added", "name": ds["name"]}


def update_datasource(state: GrafanaState, uid: str, *, body, query):
    if uid not in state.datasources:
        return 404, {"message": "Data source not found"}
    ds = state.datasources[uid]
    if "version" in body and body["version"] != ds["version"]:
        return 409, {"message": "Datasource has already been updated by someone else. Please reload and try again"}
    if not body.get("name") or not body.get("type"):
        return 400, {"message": "Required fields name and type"}
    if any(d["name"] == body["name"] and u != uid for u, d in state.datasources.items()):
        return 409, {"message": "data source with the same name already exists"}
    for key in _DS_FIELDS:
        if key in body:
            ds[key] = copy.deepcopy(body[key])
    ds["version"] += 1
    state.secrets.setdefault(uid, {}).update(body.get("secureJsonData") or {})
    return 200, {"datasource": _public(state, uid), "id": ds["id"], "message": "Datasource updated",
                 "name": ds["name"]}


# (method, path regex, handler, least role)
ROUTES = [
    ("GET", r"/api/search", search, "Viewer"),
    ("GET", r"/api/folders", list_folders, "Viewer"),
    ("GET", r"/api/folders/([^/]+)", get_folder, "Viewer"),
    ("POST", r"/api/folders", create_folder, "Editor"),
    ("GET", r"/api/dashboards/uid/([^/]+)", get_dashboard, "Viewer"),
    ("POST", r"/api/dashboards/db", save_dashboard, "Editor"),
    ("GET", r"/api/datasources", list_datasources, "Admin"),
    ("POST", r"/api/datasources", create_datasource, "Admin"),
    ("GET", r"/api/datasources/uid/([^/]+)", get_datasource, "Viewer"),
    ("PUT", r"/api/datasources/uid/([^/]+)", update_datasource, "Admin"),
]


class GrafanaContractServer:
    """Runs the contract server on 127.0.0.1 (a free port) in a background thread.

    >>> with GrafanaContractServer({"glsa_admin": "Admin"}) as server:
    ...     server.url  # doctest: +SKIP
    """

    def __init__(self, tokens: Dict[str, str]) -> None:
        self.state = GrafanaState(tokens)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "GrafanaContractServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
