"""Precision per card (from its compute capability, not is_bf16_supported) and where the lab listens."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ebft_engine import ConfigError
from ebft_engine.device import bf16_native, pick_precision

CUDA = torch.device("cuda:1")


@pytest.mark.parametrize("card,capability,half", [
    ("T4", (7, 5), torch.float16), ("V100", (7, 0), torch.float16), ("RTX 2080", (7, 5), torch.float16),
    ("A100", (8, 0), torch.bfloat16), ("RTX 4080", (8, 9), torch.bfloat16), ("H100", (9, 0), torch.bfloat16),
])
def test_half_precision_follows_the_cards_compute_capability(monkeypatch, card, capability, half):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there: ignored
    big = pick_precision(CUDA, "auto", 7_000_000_000)
    assert (big.storage, big.compute, big.needs_scaler) == (half, half, half == torch.float16)
    assert pick_precision(CUDA, "float32", 7_000_000_000).compute is None
    assert asked and all(torch.device(d) == CUDA for d in asked)  # judged for the device the run uses


def test_cpu_keeps_bf16_autocast_and_small_models_float32():
    assert bf16_native(torch.device("cpu"))
    p = pick_precision(torch.device("cpu"), "auto", 135_000_000)
    assert (p.storage, p.compute) == (torch.float32, torch.bfloat16)


def test_lab_listens_where_gradio_variables_say():
    from lab.policy import server_options

    assert server_options({}) == {"server_name": "127.0.0.1", "server_port": 7860}
    assert server_options({"GRADIO_SERVER_PORT": "7861", "GRADIO_SERVER_NAME": "0.0.0.0"}) == {
        "server_name": "0.0.0.0", "server_port": 7861}


@pytest.mark.parametrize("port", ["http", "0", "70000"])
def test_a_bad_port_is_one_line_and_exit_2(port):
    env = {"GRADIO_SERVER_PORT": port, "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    import os

    env = {**os.environ, **env}
    done = subprocess.run([sys.executable, "app.py"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GRADIO_SERVER_PORT:") and "7861" in lines[0]


def test_a_busy_port_is_one_line_and_exit_2():
    import os
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}
        done = subprocess.run([sys.executable, "app.py"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: GRADIO_SERVER_PORT: port {port} on 127.0.0.1 is in use")


def test_a_host_name_that_does_not_resolve_is_not_a_busy_port():
    """GRADIO_SERVER_NAME=bogus.invalid was reported as "port 7863 on bogus.invalid is in use"."""
    from lab.policy import server_options

    with pytest.raises(ConfigError) as info:
        server_options({"GRADIO_SERVER_NAME": "bogus.invalid", "GRADIO_SERVER_PORT": "7863"})
    assert info.value.field == "GRADIO_SERVER_NAME" and "'bogus.invalid' is not a host name" in str(info.value)
    assert server_options({"GRADIO_SERVER_NAME": " ", "GRADIO_SERVER_PORT": ""}) == {
        "server_name": "127.0.0.1", "server_port": 7860}  # empty values count as unset


def test_an_address_of_another_machine_is_named_as_such():
    """Gradio reports every failure to listen as no empty port; app.py asks the socket why."""
    from lab.policy import listen_failure

    assert listen_failure("192.0.2.1", 7863).startswith(  # TEST-NET-1: never this machine's
        "GRADIO_SERVER_NAME: 192.0.2.1 is not an address of this machine;")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert listen_failure("127.0.0.1", port).startswith(f"GRADIO_SERVER_PORT: port {port} on 127.0.0.1 is in use")


def test_empty_server_variables_are_dropped_before_gradio_reads_them():
    from lab.policy import drop_empty_server_variables

    env = {"GRADIO_SERVER_PORT": "", "GRADIO_SERVER_NAME": " ", "OTHER": ""}
    drop_empty_server_variables(env)
    assert env == {"OTHER": ""}
    env = {"GRADIO_SERVER_PORT": "7861"}
    drop_empty_server_variables(env)
    assert env == {"GRADIO_SERVER_PORT": "7861"}


def test_an_empty_port_variable_means_the_default_port():
    """GRADIO_SERVER_PORT='' was a 28-line traceback from Gradio's import (int('')); now it is the default 7860:
    held busy here, so the lab gets as far as listening and says so in one line."""
    import os
    import socket

    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 7860))
        busy.listen()
    except OSError:  # something else holds it already: busy either way
        pass
    try:
        env = {**os.environ, "GRADIO_SERVER_PORT": ""}
        env.pop("GRADIO_SERVER_NAME", None)
        done = subprocess.run([sys.executable, "app.py"], env=env, capture_output=True, text=True, timeout=300)
    finally:
        busy.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: GRADIO_SERVER_PORT: port 7860 on 127.0.0.1 is in use; set GRADIO_SERVER_PORT to a free port, e.g. "
        "GRADIO_SERVER_PORT=7861 python app.py"]
