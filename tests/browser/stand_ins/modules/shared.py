"""Stand-in for modules/shared.py: the options ui() reads (Options.data, options.py L100-170)."""
from types import SimpleNamespace

opts = SimpleNamespace(data={"ldg_visible_slots": 3})
