"""CI's smoke test of the benchmark command: its quick mode runs, prints every table and
writes the results file. No timing is asserted: CI machines vary."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = ["## 1. Overhead vs the ideal", "## 2. Rows saved by exact skipping",
           "## 3. Guidance math share of a step", "## 3b. The mask threshold",
           "## 4. Disabled vs no extension at all",
           "## 5. Peak memory vs N, with and without a row limit",
           "## 6. Against the reference pipeline",
           "## 7. Forge's separate concept call vs the batched rows of A1111 and reForge",
           "## 8. Keep the image (LEDITS++ inversion) vs plain img2img",
           "## 9. Keep the image: cross-attention masks vs the noise mask"]


def test_quick_benchmark_prints_every_table_and_writes_the_file(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = out.read_text()
    for header in HEADERS:
        assert header in done.stdout, f"not printed: {header}"
        assert header in written, f"not written: {header}"
    assert "torch " in written and "diffusers " in written and "Machine:" in written
