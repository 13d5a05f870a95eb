"""EBFT Lab's Gradio interface. It uses only the engine's public API and its event stream."""
