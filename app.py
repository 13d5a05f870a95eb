"""Hugging Face Spaces entry point (and `python app.py` locally): builds the lab and serves it, on 127.0.0.1:7860
unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise."""
import sys

from ebft_engine import ConfigError
from lab.policy import drop_empty_server_variables, listen_failure, server_options

if __name__ == "__main__":
    try:
        options = server_options()  # before Gradio's import, which reads GRADIO_SERVER_PORT itself
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    drop_empty_server_variables()  # an empty one means unset here; Gradio's import would fail on it
    from lab.app import main

    try:
        main(options)
    except OSError as e:  # Gradio's "Cannot find empty port", whatever kept it from listening
        if "port" not in str(e).lower():
            raise
        print(f"error: {listen_failure(options['server_name'], options['server_port'])}", file=sys.stderr)
        raise SystemExit(2) from None
