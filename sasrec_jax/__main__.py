"""`python -m sasrec_jax ...` is the `sasrec-jax` command."""

import sys

from sasrec_jax.cli import main

sys.exit(main())
