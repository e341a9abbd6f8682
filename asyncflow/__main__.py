"""``python -m asyncflow``: the command line."""

import sys

from asyncflow.cli.main import main

sys.exit(main())
