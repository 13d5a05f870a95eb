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


# The shapes of two hub models' configs (their config.json, without the network): SmolLM2-135M has 134.5M
# parameters, SmolLM2-360M 361.8M.
HUB_SHAPES = {"HuggingFaceTB/SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                 num_attention_heads=9, num_key_value_heads=3),
              "HuggingFaceTB/SmolLM2-360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                                 num_attention_heads=15, num_key_value_heads=5)}


@pytest.fixture
def hub_configs(monkeypatch):
    """The Space's policy reads a hub model's config.json: here from HUB_SHAPES, any other hub id as one the hub
    does not have (ModelLoadError, at once instead of after the hub client's retries)."""
    from transformers import LlamaConfig

    from ebft_engine import ModelLoadError
    from lab import policy

    real = policy.load_config

    def load_config(source):
        if source.path in HUB_SHAPES:
            return LlamaConfig(vocab_size=49152, tie_word_embeddings=True, **HUB_SHAPES[source.path])
        if source.path.count("/") == 1 and not source.gguf_file and not source.path.startswith("/"):
            raise ModelLoadError(f"model: cannot read {source.path!r} from the hub; check the id")
        return real(source)

    monkeypatch.setattr(policy, "load_config", load_config)

