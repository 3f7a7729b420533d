"""A stage-shaped module for tests: writes the environment it was launched with as its result.json."""

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    out = Path(sys.argv[sys.argv.index("--output") + 1])
    (out / "result.json").write_text(json.dumps({"env": dict(os.environ), "argv": sys.argv[1:]}))
