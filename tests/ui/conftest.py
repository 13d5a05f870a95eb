"""The lab launched in-process on a free port, writing its runs to a temporary folder."""
from __future__ import annotations

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_url(tmp_path_factory):
    import os

    runs = tmp_path_factory.mktemp("lab-runs")
    old = os.environ.get("EBFT_RUNS_DIR")
    os.environ["EBFT_RUNS_DIR"] = str(runs)
    from lab.app import build_app

    demo = build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    if old is None:
        os.environ.pop("EBFT_RUNS_DIR", None)
    else:
        os.environ["EBFT_RUNS_DIR"] = old
