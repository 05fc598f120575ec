"""fast_caller must give exactly what pluggy's hook caller gives, in pluggy's order."""

import pluggy
import pytest

from mesh import hookimpl, hookspecs
from mesh.plugins import fast_caller


def _manager(*plugins):
    pm = pluggy.PluginManager("mesh")
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class _Named:
    def __init__(self, name, answer=True):
        self.name = name
        self.answer = answer


class _Plain(_Named):
    @hookimpl
    def mesh_pick_endpoint(self, ctx, cluster, endpoints):
        return self.name if self.answer else None

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        return None if not self.answer else (self.name, ctx, outcome)


class _First(_Named):
    @hookimpl(tryfirst=True)
    def mesh_pick_endpoint(self, ctx, cluster, endpoints):
        return self.name if self.answer else None

    @hookimpl(tryfirst=True)
    def mesh_request_complete(self, ctx, outcome):
        return (self.name, ctx, outcome)


class _Last(_Named):
    @hookimpl(trylast=True)
    def mesh_pick_endpoint(self, ctx, cluster, endpoints):
        return self.name

    @hookimpl(trylast=True)
    def mesh_request_complete(self, ctx, outcome):
        return (self.name, outcome)


SETS = [
    (),
    (_Plain("a"),),
    (_Plain("a"), _Plain("b")),
    (_Plain("a"), _Plain("b", answer=False)),
    (_Last("z"), _Plain("a", answer=False), _First("f", answer=False), _Plain("b")),
    (_First("f"), _Plain("a"), _Last("z")),
]


@pytest.mark.parametrize("plugins", SETS, ids=lambda s: ",".join(type(p).__name__ + p.name for p in s) or "none")
def test_same_results_as_pluggy(plugins):
    pm = _manager(*plugins)
    for name, kwargs in (("mesh_pick_endpoint", dict(ctx=1, cluster=2, endpoints=[3])),
                         ("mesh_request_complete", dict(ctx=1, outcome=2))):
        caller = getattr(pm.hook, name)
        assert fast_caller(caller)(**kwargs) == caller(**kwargs), name


def test_a_hook_with_a_wrapper_keeps_pluggys_caller():
    class Wrapper:
        @hookimpl(wrapper=True)
        def mesh_pick_endpoint(self, ctx, cluster, endpoints):
            result = yield
            return f"wrapped {result}"

    pm = _manager(_Plain("a"), Wrapper())
    caller = pm.hook.mesh_pick_endpoint
    assert fast_caller(caller) is caller
    assert caller(ctx=1, cluster=2, endpoints=[3]) == "wrapped a"
