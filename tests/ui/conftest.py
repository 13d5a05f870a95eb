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


class FakeZeroGpu:
    """``spaces.GPU`` as ZeroGPU runs a decorated generator, without a GPU: each call runs in a fresh forked
    process (a worker, gone when the call returns); its arguments and every value it yields cross pickled; an
    exception raised in the worker reaches the caller as spaces raises it, a gr.Error titled "ZeroGPU worker
    error" that carries only the exception's class name. The engine refuses to run in the host process (ZeroGPU
    has no GPU there). ``calls`` lists the GPU calls made, by function name."""

    def __init__(self):
        self.calls: list[str] = []

    def wrap(self, task):
        import multiprocessing
        import pickle

        from spaces.zero.gradio import error

        def gradio_handler(*args, **kwargs):
            self.calls.append(task.__name__)
            payload = pickle.dumps((args, kwargs))  # spaces puts them on the worker's queue
            context = multiprocessing.get_context("fork")  # as spaces starts its workers
            queue = context.SimpleQueue()

            def work():
                import torch

                torch.set_num_threads(1)  # the parent's OpenMP threads do not survive the fork
                try:
                    a, k = pickle.loads(payload)
                    for value in task(*a, **k):
                        queue.put(("ok", pickle.dumps(value)))
                except Exception as e:  # noqa: BLE001 (spaces sends the class name and the traceback's text)
                    queue.put(("error", type(e).__name__))
                queue.put(("end", None))

            worker = context.Process(target=work, daemon=True)
            worker.start()
            try:
                while (item := queue.get())[0] != "end":
                    if item[0] == "error":
                        raise error("ZeroGPU worker error", item[1])
                    yield pickle.loads(item[1])
            finally:
                worker.join(timeout=60)
                if worker.is_alive():
                    worker.kill()

        return gradio_handler


@pytest.fixture
def zero_gpu(monkeypatch, tmp_path):
    """The lab as a ZeroGPU Space sees it: SPACE_ID and SPACES_ZERO_GPU set, runner's GPU jobs in FakeZeroGpu's
    workers, the engine refused in the host process, and the hub's WikiText-2 served from the lab's sample text
    (a Space evaluates on hub data only)."""
    import os
    from pathlib import Path

    from ebft_engine import data
    from lab import runner

    monkeypatch.setenv("SPACE_ID", "someone/ebft-lab")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("EBFT_RUNS_DIR", str(tmp_path / "runs"))
    host = os.getpid()
    for name in ("run", "resume"):
        engine = getattr(runner, name)

        def outside_the_host(*args, _engine=engine, _name=name, **kwargs):
            if os.getpid() == host:
                raise RuntimeError(f"the engine's {_name}() was called in the host process, outside spaces.GPU: "
                                   "ZeroGPU has no GPU there")
            return _engine(*args, **kwargs)

        monkeypatch.setattr(runner, name, outside_the_host)
    sample = (Path(__file__).resolve().parents[2] / "assets" / "text" / "sample.txt").read_text(encoding="utf-8")
    monkeypatch.setattr(data, "_load_dataset", lambda *args, **kwargs: {"text": sample.split("\n")})
    fake = FakeZeroGpu()
    for name in ("engine_events", "engine_resume", "engine_step"):  # every spaces.GPU function of the lab
        if hasattr(runner, name):
            monkeypatch.setattr(runner, name, fake.wrap(getattr(runner, name)))
    return fake
