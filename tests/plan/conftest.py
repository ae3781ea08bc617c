import sys
from pathlib import Path

# --import-mode=importlib puts no test folder on sys.path; the plan tests share plan_helpers.py.
sys.path.insert(0, str(Path(__file__).parent))
