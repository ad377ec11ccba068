"""`python -m core.cli`: the same as the `redex` command."""
import sys

from core.cli import main

sys.exit(main())
