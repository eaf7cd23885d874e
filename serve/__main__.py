"""`python -m serve BUNDLE_DIR [--host] [--port] [--workers]`: the HTTP service without the training extras."""

import sys

from serve.cli import main

sys.exit(main())
