"""``python -m client``: the ``imgsim`` command without installing its console script."""

import sys

from client.cli import main

sys.exit(main())
