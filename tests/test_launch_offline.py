"""One decision on whether the Hub can be used: HF_HUB_OFFLINE, HF_ENDPOINT and the proxy variables
are honoured, because huggingface_hub's own client asks."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO


@pytest.fixture()
def local_server():
    """An HTTP server on localhost answering every request (a Hub mirror, or a proxy); yields its URL."""
    class Answer(http.server.BaseHTTPRequestHandler):
        seen: list[str] = []

        def do_HEAD(self):
            Answer.seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Answer.seen
    server.shutdown()


def reachable(**env: str) -> str:
    """`hub_reachable()` and `hub_status()` in a fresh process (huggingface_hub reads its settings on import)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                          "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")}
    code = "from finetune.launch.offline import hub_reachable, hub_status; print(hub_reachable(), '|', hub_status())"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": REPO, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_offline_mode_asks_nobody(local_server):
    url, seen = local_server
    assert reachable(HF_HUB_OFFLINE="1", HF_ENDPOINT=url) == "False | offline mode (HF_HUB_OFFLINE=1)"
    assert seen == []


def test_the_endpoint_asked_is_hf_endpoint(local_server):
    url, seen = local_server
    assert reachable(HF_ENDPOINT=url) == f"True | reachable ({url})"
    assert seen == ["/"]
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    assert reachable(HF_ENDPOINT=closed) == f"False | unreachable ({closed}) (finetune runs offline)"


def test_the_proxy_is_used(local_server):
    url, seen = local_server
    # a host that does not resolve, reached through the proxy on localhost, which answers for it
    assert reachable(HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=url).startswith("True | reachable")
    assert seen == ["http://hub.invalid/"]
