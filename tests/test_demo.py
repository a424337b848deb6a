"""The README's demo command runs, writes its grid and ends with the grid's path."""
import os
import subprocess
import sys

from PIL import Image

from ldg_core.toy import demo


def test_demo_writes_the_grid_and_prints_its_path(tmp_path):
    out = tmp_path / "grid.png"
    run = subprocess.run([sys.executable, "-m", "ldg_core.toy.demo", "--seeds", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    assert "layout kept" in run.stdout
    table = demo.rows()
    for row in table:  # one line of the table per measured cell
        for c in row.measured:
            assert any(row.title in line and row.cells[c].caption in line for line in lines)
    with Image.open(out) as grid:
        columns = max(len(row.cells) for row in table)
        assert grid.width >= columns * demo.CELL * demo.ZOOM
        assert grid.height >= len(table) * demo.CELL * demo.ZOOM
