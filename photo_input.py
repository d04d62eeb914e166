"""The app's photo input: a gr.Image whose preprocessing never fails.

An unreadable upload (a text file named .png, a truncated JPEG) reaches the handler, which says why in words, instead
of Gradio's "Could not preprocess input component at index 0" with server paths. A subclass rather than a patched
instance, because Gradio rebuilds a component from its class whenever an event updates it. Gradio writes a .pyi stub
next to every component subclass: photo_input.pyi is that stub, committed, so importing this writes nothing.
"""
from __future__ import annotations

import gradio as gr


class PhotoInput(gr.Image):
    is_template = True  # drawn by the frontend's own Image component

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:  # PIL could not open it: diffad.data.read_image gives the reason
            return payload.path if payload is not None else None
