"""``python -m kaviz run NOTEBOOK -p NAME=VALUE ... [--out DIR] [--dry-run]`` (see kaviz.runner)."""
import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
