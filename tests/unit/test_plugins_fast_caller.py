"""fast_caller must give exactly what pluggy's hook caller gives, in pluggy's order; and when an
implementation raises, a PluginError naming the plugin and the hook, logged once per distinct failure."""

import pluggy
import pytest
from twisted.logger import globalLogPublisher

from mesh import hookimpl, hookspecs, plugins
from mesh.plugins import PluginError, PluginFailures, fast_caller


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
    assert fast_caller(caller)(ctx=1, cluster=2, endpoints=[3]) == caller(ctx=1, cluster=2, endpoints=[3]) \
        == "wrapped a"


class _Raising:
    """Raises in both hooks when ``ctx`` says so (a different line per hook)."""

    @hookimpl
    def mesh_pick_endpoint(self, ctx, cluster, endpoints):
        if ctx == "raise":
            raise KeyError(f"endpoint for request {cluster}")
        return None

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        if ctx == "raise":
            raise ValueError(outcome)


class _Wrapping:
    @hookimpl(wrapper=True)
    def mesh_pick_endpoint(self, ctx, cluster, endpoints):
        return (yield)


@pytest.fixture
def logged(monkeypatch):
    """A fresh :data:`mesh.plugins.failures`; yields the log events emitted meanwhile."""
    monkeypatch.setattr(plugins, "failures", PluginFailures(limit=3))
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _plugin_error(call, **kwargs) -> PluginError:
    with pytest.raises(PluginError) as raised:
        call(**kwargs)
    return raised.value


@pytest.mark.parametrize("plugins_in_order", [(_Raising(),), (_Plain("a", answer=False), _Raising()),
                                              (_Raising(), _Wrapping())], ids=["alone", "among-others", "wrapped"])
def test_a_raising_implementation_is_named(plugins_in_order, logged):
    pm = pluggy.PluginManager("mesh")
    pm.add_hookspecs(hookspecs)
    for index, plugin in enumerate(plugins_in_order):
        pm.register(plugin, name=f"p{index}" if not isinstance(plugin, _Raising) else "raising")
    pick = fast_caller(pm.hook.mesh_pick_endpoint)
    complete = fast_caller(pm.hook.mesh_request_complete)
    for number in range(25):
        error = _plugin_error(pick, ctx="raise", cluster=number, endpoints=[])
        assert (error.plugin, error.hook, type(error.__cause__)) == ("raising", "mesh_pick_endpoint", KeyError)
    error = _plugin_error(complete, ctx="raise", outcome=1)
    assert (error.plugin, error.hook, type(error.__cause__)) == ("raising", "mesh_request_complete", ValueError)
    assert pick(ctx="fine", cluster=0, endpoints=[]) is None
    failures = [event for event in logged if event.get("log_failure") is not None]
    assert [(event["plugin"], event["hook"]) for event in failures] == [
        ("raising", "mesh_pick_endpoint"), ("raising", "mesh_request_complete")]
    repeats = [event["count"] for event in logged if "still fails" in event.get("log_format", "")]
    assert repeats == [10]  # the 25 failures of one kind: a traceback once, a count at the 10th
    assert sorted(row["count"] for row in plugins.failures.describe()) == [1, 25]


def test_distinct_failures_are_bounded(logged):
    failures = plugins.failures
    for line in range(5):
        try:
            exec(compile("\n" * line + "raise RuntimeError('x')", "plugin.py", "exec"))
        except RuntimeError as error:
            failures.report("p", "mesh_route", error)
    assert failures.unlogged == 2 and len(failures.counts) == 3
    assert len([event for event in logged if event.get("log_failure") is not None]) == 3
    assert len([event for event in logged if "no longer logged" in event.get("log_format", "")]) == 1
