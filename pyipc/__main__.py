"""`python -m pyipc`: the pyipc command."""

import sys

from .cli import main

sys.exit(main())
