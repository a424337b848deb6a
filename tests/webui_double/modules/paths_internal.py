"""modules/paths_internal.py L30: data_path, the --data-dir (set by the tests)."""
import tempfile

data_path = tempfile.mkdtemp(prefix="webui-data-")
