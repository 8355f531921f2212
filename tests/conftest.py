import os

# albumentations phones home for a newer version on import; tests run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import sys
from pathlib import Path

# The benchmark's naive multi-scale loop (bench/naive.py) is the tests' reference too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
