"""Strategies for schemathesis, for what a fuzzer cannot guess from the document alone: real
JPEG and PNG files wherever the API takes a file, real page cursors and webhook URLs.

The schemathesis command line imports this module (`SCHEMATHESIS_HOOKS=tests.fuzz_strategies`)
to register them; nothing else imports it.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

from ingest.routes.images import encode_cursor
from tests.support import jpeg, png

# Small images of any shape, so that each generated upload is cheap to encode and to process.
_shapes = st.tuples(st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**16))
IMAGES = st.one_of(
    _shapes.map(lambda s: jpeg(s[0], s[1], seed=s[2])),
    _shapes.map(lambda s: png(s[0], s[1], seed=s[2])),
)
CURSORS = st.builds(encode_cursor, st.datetimes(timezones=st.just(None)), st.uuids())
# Callback URLs the API accepts but that can never be called: `.invalid` never resolves.
WEBHOOK_URLS = st.integers(0, 10**6).map(lambda n: f"https://hook-{n}.invalid/events")

schemathesis.openapi.format("binary", IMAGES)
schemathesis.openapi.format("cursor", CURSORS)
schemathesis.openapi.format("webhook-url", WEBHOOK_URLS)
