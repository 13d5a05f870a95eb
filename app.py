"""Hugging Face Spaces entry point (and `python app.py` locally): builds the lab and serves it on port 7860."""
from lab.app import main

if __name__ == "__main__":
    main()
