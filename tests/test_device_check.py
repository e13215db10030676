"""scripts/device_check.py, the one-shot check for GPU and TPU machines, kept working by its CPU run."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_device_check_script_runs_on_cpu(tmp_path):
    """scripts/device_check.py is for GPU/TPU machines; its --quick run on CPU keeps every path of it working."""
    report = tmp_path / "report.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["platform"] == "cpu"
    assert {c["result"] for c in result["checks"]} == {"PASS"} and len(result["checks"]) == 6
    assert "| decode batch 16 |" in done.stdout
