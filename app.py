"""Hugging Face Spaces entry point (and `python app.py` locally): builds the lab and serves it, on 127.0.0.1:7860
unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise."""
import sys

from ebft_engine import ConfigError
from lab.policy import server_options

if __name__ == "__main__":
    try:
        options = server_options()  # before Gradio's import, which reads GRADIO_SERVER_PORT itself
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from lab.app import main

    try:
        main(options)
    except OSError as e:  # Gradio's "Cannot find empty port": another lab (or anything) listens there
        if "port" not in str(e).lower():
            raise
        print(f"error: GRADIO_SERVER_PORT: port {options['server_port']} on {options['server_name']} is in use; "
              "set GRADIO_SERVER_PORT to a free port, e.g. GRADIO_SERVER_PORT=7861 python app.py", file=sys.stderr)
        raise SystemExit(2) from None
