"""Export a model: GGUF through llama.cpp's own converter and quantizer (+ Ollama Modelfile), or the Hub.

`export_gguf` and `export_hub` are imported on first use, so `python -m tuneship.export.llamacpp fetch`
(run by `make setup`) loads nothing else.
"""

from __future__ import annotations

__all__ = ["export_gguf", "export_hub"]


def __getattr__(name: str):
    if name == "export_gguf":
        from tuneship.export.gguf import export_gguf

        return export_gguf
    if name == "export_hub":
        from tuneship.export.hub import export_hub

        return export_hub
    raise AttributeError(f"module 'tuneship.export' has no attribute {name!r}")
