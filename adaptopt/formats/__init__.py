"""Formats on disk, safetensors only (docs/design.md §9): adaptopt's own adapter folders
(:mod:`.checkpoint`), exports for other tools (:mod:`.export`: a merged model, a PEFT adapter)
and crash-safe writing (:mod:`.atomic_files`).

Imports: layers, surgery and the top-level leaves. Nothing of training.
"""
