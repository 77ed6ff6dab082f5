"""The run's layout, resolved once (``hpcdqn.parallel.layout``): degrees, coordinates, roles,
the env-step schedule, stage bounds and replay per replica, with the refusals in one place."""
import pytest

from hpcdqn.config import ConfigError, load_config
from hpcdqn.parallel.grid import LayoutError
from hpcdqn.parallel.layout import Role, RunLayout
from hpcdqn.rl.schedule import Schedule


def test_layout_holds_this_ranks_place_and_the_runs_figures():
    cfg = load_config(overrides=["pp=2", "dqn.buffer_size=1000", "network.hidden=[64, 64]"])
    lay = RunLayout.resolve(cfg, world=6, rank=3)
    assert (lay.dp, lay.pp, lay.dp_rank, lay.pp_rank) == (3, 2, 1, 1)
    assert lay.roles == (Role.ENV_LEARNER,) * 6 and lay.role is Role.ENV_LEARNER
    assert lay.schedule == Schedule.resolve(cfg, 3)
    assert lay.replay_per_replica == 333 and lay.replay_here == 0 and not lay.steps_envs
    first = RunLayout.resolve(cfg, world=6, rank=2)
    assert first.steps_envs and first.replay_here == 333
    assert "env+learner: ranks 0-5 (envs and replay on first stages 0, 2, 4)" in lay.describe_roles()
    placed = lay.place(cfg["network"], (4,), 2)
    assert len(placed.stages) == 2 and len(placed.layers) == 3
    (lo0, hi0), (lo1, hi1) = placed.param_ranges
    assert lo0 == 0 and hi0 == lo1 and hi1 == 4 * 64 + 64 + 64 * 64 + 64 + 64 * 2 + 2


def test_layout_refusals_name_the_fix():
    cfg = load_config(overrides=["pp=2"])
    with pytest.raises(LayoutError, match="not divisible by pp=2"):
        RunLayout.resolve(cfg, world=3)
    with pytest.raises(ConfigError, match="memory size"):
        RunLayout.resolve(cfg, world=2, mem_per_rank="lots")
    with pytest.raises(LayoutError, match="pp=4"):
        RunLayout.resolve(load_config(overrides=["pp=4", "network.hidden=[8]"]), world=4).place(
            {"hidden": [8], "dueling": False, "kind": "auto", "cuts": [], "split_layers": False},
            (4,), 2)
