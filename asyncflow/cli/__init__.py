"""The command line: ``asyncflow run``, ``demo``, ``listen`` and ``flame`` over the pipeline,
``stats`` and ``monitor`` over what runs leave.

- :mod:`~asyncflow.cli.main`: :func:`main`, each command, exit codes
- :mod:`~asyncflow.cli.parser`: the commands' options, and the settings they name
- :mod:`~asyncflow.cli.listen`: ``asyncflow listen``'s options (:mod:`asyncflow.listen`)
- :mod:`~asyncflow.cli.progress`: the live progress line on a terminal
- :mod:`~asyncflow.cli.manifest`: ``manifest.json``, what a run was (software, model, settings, output hashes)
- :mod:`~asyncflow.cli.monitor`: ``asyncflow monitor``, reading the JSON logs back
- :mod:`~asyncflow.cli.demo`: ``asyncflow demo``'s inputs and its Dice scores
- :mod:`~asyncflow.cli.synthetic`: synthetic CT phantoms (the demo, the tiny model's training, tests)
"""

from asyncflow.cli.main import main

__all__ = ["main"]
