"""Property-based fuzzing of the collector's OpenAPI document with schemathesis: every operation,
with an admin token, an ingest-only token and no token. Checks: no 5xx, every response matches its
documented schema, status code and content type. Bounded: ``MAX_EXAMPLES`` cases per operation
and auth mode. The number of cases and 5xx found is printed as a figure."""

from __future__ import annotations

import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from moxco.collector.api import create_app
from moxco.collector.store import Store
from tests.figures import FIGURES, figure

MAX_EXAMPLES = 40
_store = Store(f"sqlite:///{tempfile.mkdtemp(prefix='moxco-fuzz-')}/runs.db")
TOKENS = {"admin": _store.create_token("fuzz-admin", ["admin"])[1],
          "ingest": _store.create_token("fuzz-ingest", ["ingest"])[1], "none": None}
_store.put_run("r", policy={"threshold": 0.5, "consecutive": 1})
_store.ingest("r", (["loss", "goodness"], [1, 1], [0.5, 0.9], [1.7e9, 1.7e9], [-1, -1]), batch_id="seed")
app = create_app(store=_store, migrate=False)
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
# requests go through Starlette's TestClient (httpx): schemathesis' own requests-based ASGI transport
# trips over urllib3-future, which another dependency installs in this environment
client = TestClient(app, raise_server_exceptions=False)
SEEN = {"cases": 0, "5xx": 0}


@pytest.mark.parametrize("who", list(TOKENS))
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case, who):
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if TOKENS[who] else {}
    SEEN["cases"] += 1
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    raw = client.request(kwargs.pop("method"), kwargs.pop("url"), headers=kwargs.get("headers"),
                         params=kwargs.get("params"), content=kwargs.get("data"), json=kwargs.get("json"))
    response = schemathesis.Response.from_any(raw)
    SEEN["5xx"] += response.status_code >= 500
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                             status_code_conformance, content_type_conformance])


def test_zz_fuzz_figure():
    figure(f"schemathesis on /api/v1/openapi.json: {len(list(schema.get_all_operations()))} operations × "
           f"3 auth modes (admin, ingest-only, none), ≤ {MAX_EXAMPLES} cases each",
           cases=SEEN["cases"], found_5xx=SEEN["5xx"])
    assert SEEN["cases"] > 0 and SEEN["5xx"] == 0
