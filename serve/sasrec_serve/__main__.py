"""`python -m sasrec_serve BUNDLE_DIR [--host] [--port] [--workers]`: the HTTP service without the training extras."""

import sys

from sasrec_serve.cli import main

sys.exit(main())
