import numpy as np
import pytest
import torch

from hpcdqn.config import learner_config, load_config
from hpcdqn.rl.schedule import epsilon_at
from hpcdqn.rl.td import td_loss, td_target


def test_double_dqn_target_uses_online_argmax_and_target_values():
    returns = torch.tensor([1.0, 2.0])
    disc = torch.tensor([0.9, 0.0])
    q_next_target = torch.tensor([[10.0, 20.0, 30.0], [5.0, 6.0, 7.0]])
    q_next_online = torch.tensor([[3.0, 1.0, 0.0], [0.0, 9.0, 1.0]])
    y_double = td_target(returns, disc, q_next_target, q_next_online)
    # online picks action 0 for row 0 -> target value 10
    assert torch.allclose(y_double, torch.tensor([1.0 + 0.9 * 10.0, 2.0]))
    y_plain = td_target(returns, disc, q_next_target)
    assert torch.allclose(y_plain, torch.tensor([1.0 + 0.9 * 30.0, 2.0]))


def test_td_loss_is_weighted_huber():
    q_all = torch.tensor([[0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    actions = torch.tensor([1, 0])
    target = torch.tensor([0.5, 1.2])
    w = torch.tensor([1.0, 0.5])
    loss, td, q = td_loss(q_all, actions, target, w, huber_delta=1.0)
    # row 0: |3-0.5| = 2.5 > 1 -> 2.5 - 0.5 = 2.0 ; row 1: 0.5 * 0.2^2 = 0.02, weighted 0.5
    assert loss.item() == pytest.approx((2.0 + 0.5 * 0.02) / 2)
    assert td.tolist() == pytest.approx([2.5, -0.2])


def test_epsilon_schedule_linear_then_flat_and_ladder():
    d = load_config(overrides=["dqn.epsilon_start=1.0", "dqn.epsilon_end=0.1",
                               "dqn.exploration_fraction=0.5"])["dqn"]
    T = 1000
    assert epsilon_at(d, T, 0) == pytest.approx(1.0)
    assert epsilon_at(d, T, 250) == pytest.approx(0.55)
    assert epsilon_at(d, T, 500) == pytest.approx(0.1)
    assert epsilon_at(d, T, 999) == pytest.approx(0.1)
    # Ape-X ladder: rank 0 keeps the base value, higher ranks explore less
    e = [epsilon_at(d, T, 250, r, 4, ladder=True) for r in range(4)]
    assert e[0] == pytest.approx(0.55) and e[3] == pytest.approx(0.55 ** 8)
    assert all(a > b for a, b in zip(e, e[1:]))


def test_adam_fast_path_is_bitwise_torch_fused_adam():
    from hpcdqn.rl.optim import adam_step, make_adam

    d = load_config()["dqn"]
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(1000))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = make_adam(p1, d), make_adam(p2, d)
    for i in range(20):
        g = torch.randn(1000) * (1e-3 if i % 2 else 10.0)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        adam_step(o2)
    assert torch.equal(p1, p2)
    assert torch.equal(o1.state[p1]["exp_avg_sq"], o2.state[p2]["exp_avg_sq"])
    assert float(o2.state[p2]["step"]) == 20


@pytest.mark.parametrize("obs_shape, dueling", [((4,), False), ((4,), True), ((4, 84, 84), True)])
def test_flat_forward_equals_sequential(obs_shape, dueling):
    from hpcdqn.parallel.flat import FlatModule
    from hpcdqn.rl.networks import build_layers

    net = FlatModule(build_layers(obs_shape, 3, [32, 32], dueling, seed=0))
    x = torch.rand(5, *obs_shape) * (255 if len(obs_shape) == 3 else 1)
    assert torch.equal(net(x), net.net(x))


@pytest.mark.parametrize("double, tau", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_phase_targets_give_the_same_updates(double, tau):
    """One target forward per phase = a forward per update: the loop syncs the target (hard or
    Polyak) only between phases."""
    from mpi4py import MPI

    from hpcdqn.learner import DataParallelLearner
    from hpcdqn.rl.networks import build_layers
    from hpcdqn.rl.replay import Batch

    cfg = load_config(overrides=[f"dqn.double={str(double).lower()}", "dqn.gradient_steps=4",
                                 f"dqn.tau={tau}", "network.hidden=[32, 32]"])
    a = DataParallelLearner(build_layers((4,), 2, [32, 32], seed=3), learner_config(cfg), MPI.COMM_SELF)
    b = DataParallelLearner(build_layers((4,), 2, [32, 32], seed=3), learner_config(cfg), MPI.COMM_SELF)
    rng = np.random.default_rng(0)

    def batch():
        B = 16
        return Batch(rng.standard_normal((B, 4)).astype(np.float32), rng.integers(0, 2, B),
                     rng.standard_normal(B).astype(np.float32),
                     rng.standard_normal((B, 4)).astype(np.float32),
                     np.full(B, 0.99, np.float32), np.ones(B, np.float32), np.arange(B))

    for phase in range(3):
        batches = [batch() for _ in range(4)]
        q = b.phase_targets(batches)
        assert q is not None and len(q) == 4
        for k in range(4):
            a.update(batches[k])
            b.update(batches[k], q[k])
        a.sync_target()      # as train.py, between phases
        b.sync_target()
    assert torch.allclose(a.online.flat, b.online.flat, atol=1e-6)
    assert torch.allclose(a.target.flat, b.target.flat, atol=1e-6)
    fresh = DataParallelLearner(build_layers((4,), 2, [32, 32], seed=3), learner_config(cfg), MPI.COMM_SELF)
    assert not torch.equal(a.online.flat, fresh.online.flat)
    assert not torch.equal(a.target.flat, fresh.target.flat)
    assert b.phase_targets(batches[:1]) is None      # one update: a forward of its own


@pytest.mark.parametrize("hidden, B, delta, per", [([64, 64], 64, 1.0, False),
                                                    ([32, 16], 37, 0.3, True), ([], 8, 2.0, True)])
def test_mlp_hand_backward_is_bitwise_autograd(hidden, B, delta, per):
    """The plain-MLP fast path (mlp_forward + mlp_td_backward) gives the same actions, gradients
    and, over many updates (clipping included), the same parameters as autograd, bit for bit."""
    from mpi4py import MPI

    from hpcdqn.learner import DataParallelLearner
    from hpcdqn.rl.networks import build_layers
    from hpcdqn.rl.replay import Batch

    cfg = load_config(overrides=[f"dqn.huber_delta={delta}", "dqn.max_grad_norm=1.0"])
    fast = DataParallelLearner(build_layers((4,), 3, hidden, seed=3), learner_config(cfg), MPI.COMM_SELF)
    slow = DataParallelLearner(build_layers((4,), 3, hidden, seed=3), learner_config(cfg), MPI.COMM_SELF)
    assert fast.mlp is not None
    slow.mlp = None   # autograd
    rng = np.random.default_rng(0)
    for _ in range(30):
        w = rng.uniform(0.1, 1.0, B).astype(np.float32) if per else np.ones(B, np.float32)
        batch = Batch(rng.standard_normal((B, 4)).astype(np.float32) * 3, rng.integers(0, 3, B),
                      rng.standard_normal(B).astype(np.float32) * 5,
                      rng.standard_normal((B, 4)).astype(np.float32),
                      np.where(rng.random(B) < 0.1, 0.0, 0.99).astype(np.float32), w, np.arange(B))
        a, b = fast.update(batch), slow.update(batch)
        if fast.updates % 5 == 0:      # target syncs (train.py: every target_update_every steps)
            fast.sync_target()
            slow.sync_target()
        assert a["loss"] == b["loss"] and a["q"] == b["q"]
        assert torch.equal(fast.online.flat.grad, slow.online.flat.grad)
        assert torch.equal(fast.online.flat, slow.online.flat)
        assert np.array_equal(fast.greedy(batch.obs), slow.greedy(batch.obs))
    # anything but a plain MLP keeps autograd
    dueling = DataParallelLearner(build_layers((4,), 2, [8], dueling=True), learner_config(cfg), MPI.COMM_SELF)
    assert dueling.mlp is None


# -- the execution plan: which gradient path, and its guards --------------------------------------
def _plan_learner(overrides=(), layers=None):
    from mpi4py import MPI

    from hpcdqn.learner import DataParallelLearner
    from hpcdqn.rl.networks import build_layers

    cfg = load_config(overrides=list(overrides))
    return DataParallelLearner(layers or build_layers((4,), 2, [32, 32], seed=3), learner_config(cfg),
                               MPI.COMM_SELF)


def test_plan_takes_the_hand_written_backward_for_exactly_linear_relu():
    from torch import nn

    plain = _plan_learner()
    assert plain.plan.gradient == "mlp-manual" and plain.mlp is not None
    assert plain.plan.manual_check == 0.0            # checked on the real network: bitwise
    assert plain.plan.sync == "none" and plain.plan.optimizer == "fused-direct"
    assert "gradient=mlp-manual" in plain.plan.describe()

    class ScaledLinear(nn.Linear):                    # a Linear subclass computes something else
        def forward(self, x):
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    odd = [nn.Sequential(ScaledLinear(4, 8), nn.ReLU()), nn.Linear(8, 2)]
    learner = _plan_learner(layers=odd)
    assert learner.plan.gradient == "autograd" and learner.mlp is None
    off = _plan_learner(["parallel.manual_backward=false"])
    assert off.plan.gradient == "autograd" and off.mlp is None


def test_plan_falls_back_to_autograd_when_the_start_up_check_fails(monkeypatch):
    from hpcdqn.rl import mlp

    real = mlp.mlp_td_backward

    def wrong(layers, *args, **kwargs):
        real(layers, *args, **kwargs)
        layers[0].dw.mul_(1.5)                        # a wrong gradient for the first layer

    monkeypatch.setattr(mlp, "mlp_td_backward", wrong)
    with pytest.warns(RuntimeWarning, match="falling back to autograd"):
        learner = _plan_learner()
    assert learner.plan.gradient == "autograd" and learner.mlp is None
    assert learner.plan.manual_check > 1e-3


def test_private_torch_apis_have_public_fallbacks(monkeypatch):
    """Without the aten kernels the plan takes autograd; without torch._fused_adam_ the step goes
    through the public Adam.step, with the same numbers."""
    from hpcdqn.rl import mlp, optim
    from hpcdqn.rl.replay import Batch

    monkeypatch.setattr(mlp, "kernels_available", lambda: False)
    assert _plan_learner().plan.gradient == "autograd"
    monkeypatch.undo()

    fast = _plan_learner(["parallel.manual_backward=false"])
    monkeypatch.setattr(optim, "direct_fused_available", lambda: False)
    public = _plan_learner(["parallel.manual_backward=false"])
    assert fast.plan.optimizer == "fused-direct" and public.plan.optimizer == "torch"
    rng = np.random.default_rng(1)
    for _ in range(10):
        B = 16
        batch = Batch(rng.standard_normal((B, 4)).astype(np.float32), rng.integers(0, 2, B),
                      rng.standard_normal(B).astype(np.float32),
                      rng.standard_normal((B, 4)).astype(np.float32),
                      np.full(B, 0.99, np.float32), np.ones(B, np.float32), np.arange(B))
        fast.update(batch)
        public.update(batch)
    assert torch.equal(fast.online.flat, public.online.flat)
    assert fast.state_scalars() == public.state_scalars()
