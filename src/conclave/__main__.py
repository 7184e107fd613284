"""``python -m conclave`` is the ``conclave`` command."""

import sys

from conclave.cli.main import main

sys.exit(main())
