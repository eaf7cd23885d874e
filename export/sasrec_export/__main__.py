"""`python -m sasrec_export RUN_DIR --out BUNDLE_DIR` (the same as `sasrec-jax export`)."""

import sys

from sasrec_export.cli import main

sys.exit(main())
