"""Execute notebooks headless — kept for old commands; the runner is ``python -m kaviz run`` (kaviz/runner.py).

    python scripts/run_notebooks.py --out reports notebooks/*.ipynb   # executed copies + HTML in reports/
    python scripts/run_notebooks.py --inplace notebooks/x.ipynb       # store fresh outputs (developers)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaviz.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
