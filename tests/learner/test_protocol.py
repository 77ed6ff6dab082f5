"""Both learners implement the whole Learner protocol, neither skips its parent's set-up, and
every collective says so in its docstring."""

import inspect

import pytest

from hpcdqn.learner import COLLECTIVES, DataParallelLearner, Learner, PipelineLearner, StageLearner



@pytest.mark.parametrize("cls", [DataParallelLearner, PipelineLearner])
def test_learners_implement_the_protocol(cls):
    assert issubclass(cls, StageLearner)
    init = inspect.getsource(cls.__init__)
    assert "super().__init__(" in init, f"{cls.__name__} must run StageLearner's set-up"
    methods = [n for n in dir(Learner) if not n.startswith("_") and callable(getattr(Learner, n))]
    missing = [n for n in methods if not callable(getattr(cls, n, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"
    for name in COLLECTIVES:
        doc = inspect.getdoc(getattr(cls, name)) or ""
        assert doc.startswith("Collective"), f"{cls.__name__}.{name}: {doc[:60]!r}"


def test_protocol_signatures_match():
    for cls in (DataParallelLearner, PipelineLearner):
        for name in ("greedy", "update"):
            want = list(inspect.signature(getattr(Learner, name)).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert got == want, f"{cls.__name__}.{name}{got} != Learner.{name}{want}"
