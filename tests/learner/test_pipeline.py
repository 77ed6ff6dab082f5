"""Pipeline model parallelism: partitioning, schedules, and (with real mpirun) equivalence to the
unpartitioned learner, training end to end, and failure handling."""
import json
import time

import h5py
import numpy as np
import pytest

from hpcdqn.rl.networks import build_layers, initial_flat, meta_layers, num_params
import torch

from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.partition import (PartitionError, balanced_cuts, boundary_offset,
                                       cut_into_stages, layer_offsets, partition, stage_modules)
from hpcdqn.parallel.pipeline import micro_splits, bubble_theory, schedule_ops
from mpi_util import TESTS, hpcdqn, run_mpi

TOL = 1e-5


# -- partition ------------------------------------------------------------------------------------
def test_balanced_partition_minimises_largest_stage():
    assert balanced_cuts([10, 10, 10, 10], 2) == [2]
    assert balanced_cuts([1, 100, 1, 1, 1], 2) == [2]
    assert balanced_cuts([5, 1, 1, 1, 1, 1, 5], 3) == [1, 6]
    # the 512 -> 4096 x 4 -> 18 benchmark net: the best contiguous split at layer boundaries
    layers = build_layers((512,), 18, [4096] * 4)
    r = partition(layers, 2)
    assert r == [(0, 2), (2, 5)]
    sizes = [sum(num_params(m) for m in layers[a:b]) for a, b in r]
    assert max(sizes) == min(max(sum(num_params(m) for m in layers[:c]),
                                 sum(num_params(m) for m in layers[c:])) for c in range(1, 5))
    assert cut_into_stages(layers, 2, split_layers=False) == [((0, 0), (2, 0)), ((2, 0), (5, 0))]
    # ... is 18.9M vs 33.6M parameters; cutting inside layer 2 by rows balances it
    st = cut_into_stages(layers, 2)
    assert st[0][1] == st[1][0] and st[0][1][0] == 2 and 0 < st[0][1][1] < 4096
    off = layer_offsets(layers)
    n = [boundary_offset(layers, b, off) - boundary_offset(layers, a, off) for a, b in st]
    assert sum(n) == off[-1] and abs(n[0] - n[1]) <= 4096


@pytest.mark.parametrize("obs,hidden,dueling,pp", [((6,), [32, 32], False, 2), ((6,), [32] * 4, False, 4),
                                                     ((6,), [32, 32], True, 4), ((4,), [16, 16], False, 7),
                                                     ((4, 84, 84), [32], False, 2)])
def test_stages_cut_inside_layers_compose_to_the_whole_network(obs, hidden, dueling, pp):
    layers = build_layers(obs, 5, hidden, dueling, seed=3)
    whole = FlatModule(layers)
    x = torch.randn(7, *obs) if len(obs) == 1 else torch.randint(0, 256, (7, *obs), dtype=torch.uint8)
    y, z, flats = whole(x), x, []
    stages = cut_into_stages(layers, pp)
    assert any(a[1] or b[1] for a, b in stages)            # some boundary is inside a layer
    for a, b in stages:
        m = FlatModule(stage_modules(layers, a, b))
        assert m.numel > 0
        z = m(z)
        flats.append(m.flat.data)
    assert torch.allclose(z, y, atol=1e-6)
    assert torch.equal(torch.cat(flats), whole.flat.data)   # stage ranges tile the flat vector
    # gradients too: the pass-through columns carry the input's gradient back
    z = x.float().requires_grad_() if len(obs) == 1 else x
    mods = [FlatModule(stage_modules(layers, a, b)) for a, b in stages]
    out = z
    for m in mods:
        out = m(out)
    out.square().sum().backward()
    whole2 = FlatModule(build_layers(obs, 5, hidden, dueling, seed=3))
    z2 = x.float().requires_grad_() if len(obs) == 1 else x
    whole2(z2).square().sum().backward()
    g = torch.cat([m.flat.grad for m in mods])
    assert torch.allclose(g, whole2.flat.grad, atol=1e-5, rtol=1e-5)
    if len(obs) == 1:
        assert torch.allclose(z.grad, z2.grad, atol=1e-6)


@pytest.mark.parametrize("obs,hidden,dueling,pp", [((6,), [32, 32], False, 2), ((6,), [32] * 4, False, 4),
                                                     ((6,), [32, 32], True, 4), ((4,), [16, 16], False, 7),
                                                     ((4, 84, 84), [32], False, 2),
                                                     ((4, 84, 84), [512], True, 3)])
def test_stage_only_construction_equals_the_full_build(obs, hidden, dueling, pp):
    """A stage built from the meta-device network holds exactly (bitwise) the values the full
    seeded build gives its range, row-cut pieces included, allocating only its own range."""
    full = FlatModule(build_layers(obs, 5, hidden, dueling, seed=11)).flat.data
    real_stages = cut_into_stages(build_layers(obs, 5, hidden, dueling), pp)
    rng_before = torch.random.get_rng_state()
    meta = meta_layers(obs, 5, hidden, dueling)
    assert all(p.is_meta for m in meta for p in m.parameters())
    stages = cut_into_stages(meta, pp)
    assert stages == real_stages
    assert any(a[1] or b[1] for a, b in stages) or len(obs) == 3
    off = layer_offsets(meta)
    for a, b in stages:
        lo, hi = boundary_offset(meta, a, off), boundary_offset(meta, b, off)
        m = FlatModule(stage_modules(meta, a, b))
        assert m.meta and m.numel == hi - lo
        assert all(not p.is_meta for p in m.parameters())
        m.load_flat_(initial_flat(meta, 11, lo, hi))
        assert torch.equal(m.flat.data, full[lo:hi])
        t = FlatModule(stage_modules(meta, a, b), grad=False)
        assert t.flat.grad is None and all(p.grad is None for p in t.parameters())
    assert torch.equal(initial_flat(meta, 11), full)
    assert not torch.equal(initial_flat(meta, 12), full)
    assert torch.equal(rng_before, torch.random.get_rng_state())    # global RNG untouched


@pytest.mark.parametrize("obs,hidden,dueling,pp", [((4,), [64, 64], False, 2), ((4,), [8] * 4, True, 4),
                                                     ((4, 84, 84), [512], False, 2),
                                                     ((4, 84, 84), [512], True, 7)])
def test_partition_covers_every_layer_once(obs, hidden, dueling, pp):
    layers = build_layers(obs, 6, hidden, dueling)
    r = partition(layers, pp)
    assert len(r) == pp and r[0][0] == 0 and r[-1][1] == len(layers)
    assert all(b > a for a, b in r) and all(r[i][1] == r[i + 1][0] for i in range(pp - 1))


def test_explicit_cuts_and_clear_errors():
    layers = build_layers((4,), 2, [16, 16])          # 3 layers
    assert partition(layers, 2, [1]) == [(0, 1), (1, 3)]
    assert partition(layers, 3, [1, 2]) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(PartitionError, match="out of range"):
        partition(layers, 2, [3])
    with pytest.raises(PartitionError, match="makes 3 stages but pp=2"):
        partition(layers, 2, [1, 2])
    with pytest.raises(PartitionError, match="only 3 layers"):
        partition(layers, 4)
    with pytest.raises(PartitionError, match="only 3 layers"):
        partition(layers, 4, [1, 2, 3])
    with pytest.raises(PartitionError, match="only 3 layers"):
        cut_into_stages(layers, 4, split_layers=False)
    assert len(cut_into_stages(layers, 4)) == 4                 # rows of the 16-wide layers
    with pytest.raises(PartitionError, match="cannot each get parameters"):
        cut_into_stages(build_layers((1,), 1, [1]), 5)


# -- schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("n_stages,M", [(2, 1), (2, 4), (4, 2), (4, 6), (3, 16)])
def test_schedules_run_each_step_once_forward_before_backward(kind, n_stages, M):
    for s in range(n_stages):
        ops = schedule_ops(kind, s, n_stages, M)
        assert sorted(ops) == sorted([("F", m) for m in range(M)] + [("B", m) for m in range(M)])
        assert [m for k, m in ops if k == "F"] == list(range(M))
        assert [m for k, m in ops if k == "B"] == list(range(M))
        live, peak = 0, 0
        for k, m in ops:
            assert k == "F" or ops.index(("F", m)) < ops.index(("B", m))
            live += 1 if k == "F" else -1
            peak = max(peak, live)
        assert peak == (M if kind == "gpipe" else min(M, n_stages - s))


@pytest.mark.parametrize("n_stages,M", [(2, 1), (2, 4), (4, 2), (4, 6), (3, 16)])
def test_zero_bubble_schedule_splits_the_backward_within_1f1b_memory(n_stages, M):
    from hpcdqn.parallel.pipeline import bubble_simulated

    for s in range(n_stages):
        ops = schedule_ops("zbh1", s, n_stages, M)
        for k in "FBW":
            assert [m for kind, m in ops if kind == k] == list(range(M))   # W in 1F1B's order
        live, peak = 0, 0
        for k, m in ops:
            if k != "F":
                assert ops.index((k, m)) > ops.index(("F" if k == "B" else "B", m))
            live += {"F": 1, "B": 0, "W": -1}[k]
            peak = max(peak, live)
        assert peak <= min(M, n_stages)          # 1F1B's peak (its first stage's)
    zb, ofob = bubble_simulated(n_stages, M, "zbh1"), bubble_simulated(n_stages, M, "1f1b")
    assert all(z <= o + 1e-12 for z, o in zip(zb, ofob))
    if M > 1:
        assert zb[0] < ofob[0]


@pytest.mark.parametrize("n_stages,M", [(2, 1), (2, 4), (3, 5), (4, 8)])
def test_bubble_simulation_reproduces_textbook_and_early_send_beats_it(n_stages, M):
    from hpcdqn.parallel.pipeline import bubble_simulated

    for kind in ("gpipe", "1f1b"):
        fused = bubble_simulated(n_stages, M, kind, early_send=False)
        assert fused[0] == pytest.approx(bubble_theory(n_stages, M))   # stage 0 spans the whole step
        early = bubble_simulated(n_stages, M, kind)
        assert all(e <= f + 1e-12 for e, f in zip(early, fused))
        assert early[-1] < fused[-1]


def test_split_and_bubble_theory():
    assert micro_splits(48, 4) == [(0, 12), (12, 24), (24, 36), (36, 48)]
    assert micro_splits(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert micro_splits(2, 8) == [(0, 1), (1, 2)]
    assert bubble_theory(2, 1) == 0.5 and bubble_theory(4, 6) == 3 / 9


# -- equivalence with real mpirun -------------------------------------------------------------------
SUITES = {"mlp2": (2, "mlp", 2), "mlp4": (4, "mlp", 4), "arch": (2, "arch", 2), "dp": (4, "dp", 2)}


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """Run each suite once (lazily); returns the output folder."""
    done = {}

    def get(suite):
        if suite not in done:
            n, name, pp = SUITES[suite]
            out = tmp_path_factory.mktemp(suite)
            run_mpi(n, [TESTS / "learner" / "pp_equivalence.py", out, name, pp], timeout=300)
            done[suite] = out
        return done[suite]

    return get


def _cases(suite):
    n, name, pp = SUITES[suite]
    if name == "mlp":
        return [f"mlp_pp{pp}_{s}_{d}_M{m}" for s in ("gpipe", "1f1b", "zbh1")
                for d in ("single", "double")
                for m in ((1, 4) if pp == 2 else (2, 6))]
    if name == "arch":
        return ["dueling_mlp", "cnn", "dueling_cnn_cut3", "mlp_whole_layers", "minatar_cnn"]
    return ["dp2_pp2_gpipe", "dp2_pp2_1f1b", "dp2_pp2_zbh1", "dp2_pp2_minatar"]


ALL = [(s, c) for s in SUITES for c in _cases(s)]


@pytest.mark.parametrize("suite,case", ALL, ids=[c for _, c in ALL])
def test_pipeline_equals_unpartitioned(equivalence, suite, case):
    out = equivalence(suite)

    def diff(kind):
        a = np.load(out / f"{case}_{kind}pp.npy")
        b = np.load(out / f"{case}_{kind}ref.npy")
        assert a.shape == b.shape, (kind, a.shape, b.shape)
        return float(np.abs(a - b).max())

    d = {k or "params": diff(k) for k in ("q0_", "q1_", "td_", "")}
    print(case, d)
    assert d["q0_"] <= TOL, d       # Q-values at init (forward through the stages)
    assert d["td_"] <= TOL, d       # |TD| of the first update reached the first stage
    assert d["params"] <= TOL, d    # online + target after K updates
    assert d["q1_"] <= TOL, d
    # the comparison can fail: the updates moved the parameters, and clipping was active
    init = np.load(out / f"{case}_init.npy")
    ref = np.load(out / f"{case}_ref.npy")[:init.size]
    assert np.abs(ref - init).max() > 1e-3
    assert np.load(out / f"{case}_gradnorm_ref.npy").max() > 0.1


@pytest.mark.parametrize("suite", ["mlp2", "mlp4"])
def test_zero_bubble_is_bitwise_1f1b_on_the_hand_written_path(equivalence, suite):
    """ZB-H1 runs each micro-batch's weight-gradient products in micro-batch order, as 1F1B
    does: the same sums in the same order, so the parameters after K updates are bit for bit
    1F1B's; every stage took the hand-written backward (the plan names it per stage)."""
    out = equivalence(suite)
    pp = SUITES[suite][2]
    for d in ("single", "double"):
        for m in ((1, 4) if pp == 2 else (2, 6)):
            zb = np.load(out / f"mlp_pp{pp}_zbh1_{d}_M{m}_pp.npy")
            assert np.array_equal(zb, np.load(out / f"mlp_pp{pp}_1f1b_{d}_M{m}_pp.npy"))
            plan = (out / f"mlp_pp{pp}_zbh1_{d}_M{m}_plan.txt").read_text()
            assert "gradient per stage: " + ", ".join(f"{s}: mlp-manual" for s in range(pp)) in plan
    arch = (equivalence("arch") / "cnn_plan.txt").read_text()
    assert "0: autograd-accumulate, 1: autograd-accumulate" in arch


# -- training end to end -----------------------------------------------------------------------------
TINY = ["total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=10",
        "log.progress=false", "log.tensorboard=false", "parallel.check_every=10"]


def test_train_pp2_prioritized_end_to_end(tmp_path):
    r = hpcdqn(2, ["train", *TINY, "pp=2", "micro_batches=4", "schedule=gpipe",
                   "replay.prioritized=true", f"run_dir={tmp_path / 'run'}"], timeout=240)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["pp"] == 2 and s["dp"] == 1 and s["updates"] > 0
    assert s["eval_episodes"] == 10 and np.isfinite(s["eval_return_mean"])
    with h5py.File(tmp_path / "run" / "model.h5") as f:
        n = f["online"].shape[0]
    assert n == sum(num_params(m) for m in build_layers((4,), 2, [32, 32]))
    r = hpcdqn(1, ["eval", str(tmp_path / "run"), "--episodes", "2"], timeout=120)
    assert json.loads(r.stdout.strip().splitlines()[-1])["eval_episodes"] == 2


def test_bad_cut_is_a_clear_error(tmp_path):
    r = hpcdqn(2, ["train", "pp=2", "network.cuts=[3]", "network.hidden=[32, 32]",
                   f"run_dir={tmp_path}/x", "log.progress=false"], timeout=120, check=False)
    assert r.returncode != 0
    assert "cut 3 is out of range" in r.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_exception_on_one_stage_ends_pp2_job(tmp_path, rank):
    t = time.time()
    r = run_mpi(2, [TESTS / "learner" / "pp_fail_stage.py", tmp_path / "run", rank], timeout=90, check=False)
    took = time.time() - t
    assert r.returncode != 0
    assert took < 30, took
    assert f"[hpcdqn rank {rank}/2]" in r.stderr
    assert f"ZeroDivisionError: injected failure on pipeline stage {rank}" in r.stderr
    assert "Traceback" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(1260)  # the run's own limit is 1200 s (a loaded machine: ~600 s)
def test_pp2_learns_cartpole(tmp_path):
    r = hpcdqn(2, ["train", "pp=2", "micro_batches=4", f"run_dir={tmp_path / 'run'}",
                   "log.progress=false"], timeout=1200)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["env_steps"] == 50000 and s["pp"] == 2
    assert s["eval_return_mean"] >= 475, s
