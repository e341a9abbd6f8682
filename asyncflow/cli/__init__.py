"""The command line: ``asyncflow run``, ``demo`` and ``flame`` over the pipeline, ``stats`` and
``monitor`` over what runs leave (:func:`main`)."""

from asyncflow.cli.main import main

__all__ = ["main"]
