"""Turns pykvm's pytest plugin on for `pytest examples/` where it is not installed as an entry
point (a checkout without `pip install`, or PYTEST_DISABLE_PLUGIN_AUTOLOAD=1). Where it is, this
line does nothing: the entry point is named after the module, so pytest sees it is loaded."""

pytest_plugins = ["pykvm.testing"]
