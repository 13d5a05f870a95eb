"""The Learn tab: the EBFT figure and the teaching pages of assets/teaching/."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

TEACHING_DIR = Path(__file__).resolve().parents[2] / "assets" / "teaching"


def teaching_pages() -> list[tuple[str, str]]:
    """(title, body) of each assets/teaching/*.md, in file-name order; the title is the page's '# ' line."""
    pages = []
    for page in sorted(TEACHING_DIR.glob("*.md")):
        first, _, body = page.read_text(encoding="utf-8").partition("\n")
        pages.append((first[2:].strip(), body) if first.startswith("# ") else (page.stem, first + "\n" + body))
    return pages


def create_learn_panel() -> None:
    gr.HTML((TEACHING_DIR / "ebft-figure.svg").read_text(encoding="utf-8"), elem_id="ebft-figure")
    for title, text in teaching_pages():
        with gr.Accordion(title, open=False):
            gr.Markdown(text)
