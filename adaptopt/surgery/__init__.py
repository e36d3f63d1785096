"""Model surgery: finding target layers and putting adapter layers into a model
(:mod:`.inject`), swapping modules in and out whole or not at all (:mod:`.swap`), and taking
adapters back out (:mod:`.unload`: ``merge_and_unload``, ``disable_adapters``).

Imports: :mod:`adaptopt.layers` and the top-level leaves. Nothing of training or formats.
"""
