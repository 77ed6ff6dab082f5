"""The C51 head (``network.head = "c51"``): its loss's projection, its gradient on the
hand-written MLP path, greedy actions by the mean return, and a short CartPole run in both
learners (data-parallel dp=2 and pipelined pp=2)."""

import json

import numpy as np
import pytest
import torch

from mpi_util import hpcdqn

from hpcdqn.config import ConfigError, learner_config, load_config
from hpcdqn.rl.losses import C51Loss, greedy_actions, make_loss

C51 = ["network.head=c51", "network.atoms=5", "network.v_min=-2.0", "network.v_max=2.0"]


def test_projection_keeps_the_mass_and_lands_on_the_atoms():
    cfg = load_config(overrides=C51)
    loss = make_loss(cfg["dqn"], cfg["network"])
    assert isinstance(loss, C51Loss)
    torch.manual_seed(0)
    nxt = torch.randn(4, 2 * 5)                          # 2 actions x 5 atoms (support -2..2)
    lab = {"returns": torch.tensor([0.5, 1.0, 9.0, 0.0]),
           "discounts": torch.tensor([0.0, 0.0, 0.0, 0.5])}
    m = loss.target(lab, nxt)
    assert torch.allclose(m.sum(1), torch.ones(4))
    assert torch.allclose(m[0], torch.tensor([0, 0, 0.5, 0.5, 0]))   # 0.5: halfway between atoms 0 and 1
    assert torch.allclose(m[1], torch.tensor([0, 0, 0, 1.0, 0]))     # exactly on atom 1
    assert torch.allclose(m[2], torch.tensor([0, 0, 0, 0, 1.0]))     # clipped to v_max
    # discount 0.5: the next state's greedy distribution, shrunk onto [-1, 1]
    p = torch.softmax(nxt.view(4, 2, 5), -1)[3]
    a = int((p * torch.linspace(-2, 2, 5)).sum(-1).argmax())
    pa = p[a]
    want = torch.tensor([0, pa[0] + pa[1] / 2, pa[1] / 2 + pa[2] + pa[3] / 2, pa[3] / 2 + pa[4], 0])
    assert torch.allclose(m[3], want, atol=1e-6)


def test_greedy_by_the_mean_return_and_the_hand_written_gradient():
    from mpi4py import MPI

    from hpcdqn.learner import DataParallelLearner
    from hpcdqn.rl.networks import network_layers

    cfg = load_config(overrides=C51 + ["network.hidden=[16]"])
    out = torch.full((1, 10), -20.0)
    out[0, 4] = out[0, 5] = 20.0          # action 0: all at +2; action 1: all at -2
    assert greedy_actions(out, make_loss(cfg["dqn"], cfg["network"])).tolist() == [0]
    assert greedy_actions(out).tolist() == [4]                     # (a Q head would take 4)
    learner = DataParallelLearner(network_layers(cfg["network"], (4,), 2, seed=0, meta=False),
                                  learner_config(cfg),
                                  MPI.COMM_SELF)
    assert learner.online.numel == 4 * 16 + 16 + 16 * 10 + 10      # n_actions x atoms outputs
    # the loss's dL/dQ (autograd on the loss alone) through the written-out MLP: autograd's bits
    assert learner.plan.gradient == "mlp-manual" and learner.plan.manual_check == 0.0
    with pytest.raises(ConfigError, match="v_min < network.v_max"):
        load_config(overrides=C51 + ["network.v_min=3.0"])


def test_c51_learns_cartpole_in_both_learners(tmp_path):
    """3000 env steps (~1000 updates) of C51 on CartPole, seed 1, dp=2 then pp=2: the greedy
    return is asked to be at least 3x random play's (~22), chosen before any run (a learning
    signal, not a solve; the full runs are in docs/walkthrough_c51.md)."""
    for name, layout in (("dp2", []), ("pp2", ["pp=2", "micro_batches=4"])):
        r = hpcdqn(2, ["train", *layout, "network.head=c51", "network.atoms=101",
                       "network.v_min=-100.0", "network.v_max=100.0", "total_steps=3000",
                       "eval.episodes=10", "checkpoint=false",
                       f"run_dir={tmp_path / name}", "log.progress=false"], timeout=300)
        s = json.loads(r.stdout.strip().splitlines()[-1])
        assert s["env_steps"] == 3000 and (s["dp"], s["pp"]) == ((2, 1) if name == "dp2" else (1, 2))
        assert s["eval_return_mean"] >= 66, (name, s["eval_return_mean"])
