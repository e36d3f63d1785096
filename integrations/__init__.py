"""Thin adapters from adaptopt to other frameworks (Hugging Face Trainer, raw loops, DDP, the CLI).

Shipped as the import package ``adaptopt.integrations``. Unlike the core, modules here
may import transformers, datasets or matplotlib, always at the point of use.
"""
