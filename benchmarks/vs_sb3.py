"""hpcdqn vs Stable-Baselines3 DQN on CartPole-v1, same hyperparameters, one thread each.

    python benchmarks/vs_sb3.py [--seeds 1,2 | --seeds 1-30] [--steps 50000]

Hyperparameters: rl-baselines3-zoo's CartPole-v1 DQN (net [256, 256], lr 2.3e-3, batch 64,
buffer 100000, learning_starts 1000, gamma 0.99, target_update_interval 10, train_freq 256,
gradient_steps 128, exploration_fraction 0.16, exploration_final_eps 0.04, Huber loss,
max_grad_norm 10, plain (not double) DQN).

SB3 counts ``target_update_interval`` in *env steps* and syncs during rollouts; with
train_freq 256 and gradient_steps 128 that means the target is the online net as it stood at the
start of each 128-update phase. hpcdqn counts ``dqn.target_update_every`` in env steps too (a sync
before that step's training phase), so the same value means the same schedule.

hpcdqn also follows SB3's schedule (uniform actions before learning_starts, a phase after env
steps 1024, 1280, ...); tests/test_vs_sb3.py checks that schedule and the update against SB3
itself. This zoo config's final return swings with the seed for *both* libraries (a collapse late
in training), so ``final_return`` compares the two over all seeds: means, a bootstrap 95%
interval of the difference and a permutation test. Use many seeds (``--seeds 1-30``).

Each run is a fresh subprocess (torch.set_num_threads(1)); both are evaluated with the same
greedy 100-episode evaluation. Wall time is the training loop alone (SB3: ``model.learn``).
Prints one JSON object with both sides and the ratios. SB3 is a benchmark extra
(``pip install 'hpcdqn[bench]'``), not a runtime dependency.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

ZOO = dict(lr=2.3e-3, batch=64, buffer=100_000, learning_starts=1000, gamma=0.99,
           target_update_interval=10, train_freq=256, gradient_steps=128,
           exploration_fraction=0.16, final_eps=0.04, net=[256, 256])


def hpcdqn_overrides(steps, seed, run_dir, **zoo):
    """``hpcdqn train`` overrides for ZOO (entries overridden by ``zoo``): SB3's DQN."""
    z = {**ZOO, **zoo}
    return [f"seed={seed}", f"total_steps={steps}", f"run_dir={run_dir}", "threads=1",
            f"network.hidden={z['net']}", "network.dueling=false",
            f"dqn.lr={z['lr']}", "dqn.lr_final_fraction=1.0", f"dqn.batch_size={z['batch']}",
            f"dqn.buffer_size={z['buffer']}", f"dqn.learning_starts={z['learning_starts']}",
            "dqn.uniform_warmup=true",   # SB3 acts uniformly at random before learning_starts
            f"dqn.gamma={z['gamma']}", f"dqn.train_frequency={z['train_freq']}",
            f"dqn.gradient_steps={z['gradient_steps']}",
            f"dqn.target_update_every={z['target_update_interval']}",  # env steps, as SB3
            "dqn.tau=1.0", "dqn.double=false", "dqn.n_step=1", "dqn.max_grad_norm=10",
            "dqn.huber_delta=1.0", "dqn.epsilon_start=1.0", f"dqn.epsilon_end={z['final_eps']}",
            f"dqn.exploration_fraction={z['exploration_fraction']}", "replay.prioritized=false",
            "num_envs=1", "eval.episodes=100", "eval.num_envs=10", "checkpoint=false",
            "log.progress=false", "log.tensorboard=false"]


def sb3_kwargs(**zoo):
    """SB3 ``DQN(...)`` keyword arguments for ZOO (entries overridden by ``zoo``)."""
    z = {**ZOO, **zoo}
    return dict(learning_rate=z["lr"], batch_size=z["batch"], buffer_size=z["buffer"],
                learning_starts=z["learning_starts"], gamma=z["gamma"],
                target_update_interval=z["target_update_interval"], train_freq=z["train_freq"],
                gradient_steps=z["gradient_steps"], exploration_fraction=z["exploration_fraction"],
                exploration_final_eps=z["final_eps"], policy_kwargs={"net_arch": z["net"]})


def one_hpcdqn(steps, seed):
    out = tempfile.mkdtemp(prefix="hpcdqn-vs-sb3-")
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "train",
                        *hpcdqn_overrides(steps, seed, out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": s["wall_s"], "env_steps": s["env_steps"], "updates": s["updates"],
            "sps": s["env_steps"] / s["wall_s"], "ups": s["updates"] / s["wall_s"],
            "eval_return_mean": s["eval_return_mean"], "eval_return_std": s["eval_return_std"]}


def one_sb3(steps, seed):
    """Runs in its own subprocess (see main)."""
    import torch
    from stable_baselines3 import DQN

    from hpcdqn.rl.evaluate import evaluate

    torch.set_num_threads(1)
    model = DQN("MlpPolicy", "CartPole-v1", **sb3_kwargs(), seed=seed, device="cpu", verbose=0)
    t = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t
    q = model.policy.q_net

    @torch.no_grad()
    def policy(obs):
        return q(torch.as_tensor(obs, dtype=torch.float32)).argmax(1).numpy()

    ev = evaluate(policy, "CartPole-v1", 100, 10, seed + 10_000_000)
    updates = model._n_updates
    return {"wall_s": wall, "env_steps": int(model.num_timesteps), "updates": int(updates),
            "sps": model.num_timesteps / wall, "ups": updates / wall,
            "eval_return_mean": ev["eval_return_mean"], "eval_return_std": ev["eval_return_std"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--one", choices=["sb3"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one == "sb3":
        print(json.dumps(one_sb3(a.steps, a.seed)))
        return
    seeds = [i for part in a.seeds.split(",")            # "1,2,5" or "1-30"
             for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
    rows = {"sb3": [], "hpcdqn": []}
    for seed in seeds:   # one after the other in the same run, alternating
        r = subprocess.run([sys.executable, __file__, "--one", "sb3", "--seed", str(seed),
                            "--steps", str(a.steps)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        rows["sb3"].append({"seed": seed, **json.loads(r.stdout.strip().splitlines()[-1])})
        rows["hpcdqn"].append({"seed": seed, **one_hpcdqn(a.steps, seed)})

    def mean(side, k):
        return sum(x[k] for x in rows[side]) / len(rows[side])

    summary = {k: {m: round(mean(k, m), 2) for m in ("wall_s", "sps", "ups", "eval_return_mean")}
               for k in rows}
    for k in rows:
        summary[k]["solved"] = sum(x["eval_return_mean"] >= 475 for x in rows[k])
    print(json.dumps({
        "benchmark": "vs_sb3", "env_id": "CartPole-v1", "steps": a.steps, "seeds": seeds,
        "threads": 1, "runs": rows, "mean": summary,
        "ratio_sps": round(summary["hpcdqn"]["sps"] / summary["sb3"]["sps"], 2),
        "ratio_ups": round(summary["hpcdqn"]["ups"] / summary["sb3"]["ups"], 2),
        "ratio_wall": round(summary["sb3"]["wall_s"] / summary["hpcdqn"]["wall_s"], 2),
        "final_return": compare_returns([x["eval_return_mean"] for x in rows["hpcdqn"]],
                                        [x["eval_return_mean"] for x in rows["sb3"]])}))


def compare_returns(a, b, n=100_000):
    """Final eval returns across seeds, hpcdqn (a) vs SB3 (b): the difference of means with a
    bootstrap 95% interval (seeds resampled within each side) and a two-sided permutation test.
    "Equal" here means the interval contains 0: no difference these seeds can detect."""
    import numpy as np

    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(0)
    boot = (a[rng.integers(0, len(a), (n, len(a)))].mean(1)
            - b[rng.integers(0, len(b), (n, len(b)))].mean(1))
    pooled = np.concatenate([a, b])
    perm = rng.permuted(np.broadcast_to(pooled, (n, len(pooled))), axis=1)
    d_perm = perm[:, :len(a)].mean(1) - perm[:, len(a):].mean(1)
    diff = a.mean() - b.mean()
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"hpcdqn_mean": round(float(a.mean()), 1),
            "hpcdqn_std": round(float(a.std(ddof=1)), 1) if len(a) > 1 else 0.0,
            "sb3_mean": round(float(b.mean()), 1),
            "sb3_std": round(float(b.std(ddof=1)), 1) if len(b) > 1 else 0.0,
            "diff_mean": round(float(diff), 1), "diff_ci95": [round(float(lo), 1), round(float(hi), 1)],
            "permutation_p": round(float((np.abs(d_perm) >= abs(diff) - 1e-9).mean()), 3),
            "equal_within_ci": bool(lo <= 0 <= hi)}


if __name__ == "__main__":
    main()
