"""Stand-in for modules/script_callbacks.py: registrations made at load are recorded only."""
registered = []


def on_ui_settings(callback, *, name=None):
    registered.append(("ui_settings", callback))


def on_before_ui(callback, *, name=None):
    registered.append(("before_ui", callback))
