import sys
from pathlib import Path

# The tests run against the source tree even without `pip install -e`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
