"""pytest plugin for mutation runs (`-p tests.mutation_plugin`, set in [tool.mutmut] pytest_add_cli_args):
deselects every test that needs the session-wide tiny pipeline (`tiny_run`), which a mutation worker would
otherwise rebuild for each mutant. Those tests guard the stage `run` bodies; bench/mutation.py leaves them out."""
from __future__ import annotations

SLOW_FIXTURES = {"tiny_run"}


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (drop if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
