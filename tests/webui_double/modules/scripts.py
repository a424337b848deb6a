"""modules/scripts.py: AlwaysVisible, Script and the runner's hook calls, each wrapped in
try/except as the WebUI does (L820-996): an exception in a hook is reported, never raised."""
AlwaysVisible = object()
scripts_data = []  # (script_class, path, basedir, module) of every loaded script (L316-330)


class Script:
    def elem_id(self, item_id):
        return f"script_{item_id}"


class ScriptRunner:
    def __init__(self, scripts_and_args):
        self.entries = scripts_and_args  # [(script, args)]
        self.alwayson_scripts = [script for script, _ in scripts_and_args]
        self.reported = []

    def _each(self, hook, *a, **kw):
        for script, args in self.entries:
            try:
                getattr(script, hook, lambda *x, **y: None)(*a, *args, **kw)
            except Exception as error:
                self.reported.append(error)

    def process(self, p):
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        for script, args in self.entries:
            try:
                getattr(script, "process_before_every_sampling", lambda *a, **k: None)(p, *args, **kwargs)
            except Exception as error:
                self.reported.append(error)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
