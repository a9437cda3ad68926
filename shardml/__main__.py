"""``python -m shardml``: the same as the ``shardml`` command."""

import sys

from shardml.run.cli import main

sys.exit(main())
