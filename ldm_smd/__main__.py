"""``python -m ldm_smd`` runs the command line."""

import sys

from ldm_smd.cli import main

sys.exit(main())
