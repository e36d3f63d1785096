"""The ``adaptopt`` command: an application built on the library (``adaptopt demo | train |
compare | tune | scan``), with its YAML configs, data and model registries, runs, paired
statistics and reports. Entry point: :func:`adaptopt.cli.main.main`.

Unlike the library, this package may import transformers, datasets, yaml and matplotlib (at the
point of use) and the framework adapters in ``adaptopt.integrations``; nothing in the library
imports it. The demo config ships inside it (``configs/main_job.yaml``).
"""
