"""Stand-in for modules/paths_internal.py: data_path is the WebUI's --data-dir."""
import os
import tempfile

data_path = os.environ.get("LDG_DATA_DIR") or tempfile.mkdtemp(prefix="ldg-ui-data-")
