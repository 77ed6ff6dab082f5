"""hpcdqn vs Stable-Baselines3 DQN on CartPole-v1, same hyperparameters, one thread each.

    python benchmarks/vs_sb3.py [--seeds 1,2] [--steps 50000]

Hyperparameters: rl-baselines3-zoo's CartPole-v1 DQN (net [256, 256], lr 2.3e-3, batch 64,
buffer 100000, learning_starts 1000, gamma 0.99, target_update_interval 10, train_freq 256,
gradient_steps 128, exploration_fraction 0.16, exploration_final_eps 0.04, Huber loss,
max_grad_norm 10, plain (not double) DQN).

SB3 counts ``target_update_interval`` in *env steps* and syncs during rollouts; with
train_freq 256 and gradient_steps 128 that means the target is the online net as it stood at the
start of each 128-update phase. hpcdqn counts it in updates, so the same schedule is
``dqn.target_update_every=128``.

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


def hpcdqn_overrides(steps, seed, run_dir):
    return [f"seed={seed}", f"total_steps={steps}", f"run_dir={run_dir}", "threads=1",
            f"network.hidden={ZOO['net']}", "network.dueling=false",
            f"dqn.lr={ZOO['lr']}", "dqn.lr_final_fraction=1.0", f"dqn.batch_size={ZOO['batch']}",
            f"dqn.buffer_size={ZOO['buffer']}", f"dqn.learning_starts={ZOO['learning_starts']}",
            f"dqn.gamma={ZOO['gamma']}", f"dqn.train_frequency={ZOO['train_freq']}",
            f"dqn.gradient_steps={ZOO['gradient_steps']}",
            f"dqn.target_update_every={ZOO['gradient_steps']}",  # == SB3's 10 env steps, see above
            "dqn.tau=1.0", "dqn.double=false", "dqn.n_step=1", "dqn.max_grad_norm=10",
            "dqn.huber_delta=1.0", "dqn.epsilon_start=1.0", f"dqn.epsilon_end={ZOO['final_eps']}",
            f"dqn.exploration_fraction={ZOO['exploration_fraction']}", "replay.prioritized=false",
            "num_envs=1", "eval.episodes=100", "eval.num_envs=10", "checkpoint=false",
            "log.progress=false", "log.tensorboard=false"]


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

    from hpcdqn.evaluate import evaluate

    torch.set_num_threads(1)
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=ZOO["lr"], batch_size=ZOO["batch"],
                buffer_size=ZOO["buffer"], learning_starts=ZOO["learning_starts"],
                gamma=ZOO["gamma"], target_update_interval=ZOO["target_update_interval"],
                train_freq=ZOO["train_freq"], gradient_steps=ZOO["gradient_steps"],
                exploration_fraction=ZOO["exploration_fraction"],
                exploration_final_eps=ZOO["final_eps"], policy_kwargs={"net_arch": ZOO["net"]},
                seed=seed, device="cpu", verbose=0)
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
    seeds = [int(s) for s in a.seeds.split(",")]
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
    print(json.dumps({
        "benchmark": "vs_sb3", "env_id": "CartPole-v1", "steps": a.steps, "seeds": seeds,
        "threads": 1, "runs": rows, "mean": summary,
        "ratio_sps": round(summary["hpcdqn"]["sps"] / summary["sb3"]["sps"], 2),
        "ratio_ups": round(summary["hpcdqn"]["ups"] / summary["sb3"]["ups"], 2),
        "ratio_wall": round(summary["sb3"]["wall_s"] / summary["hpcdqn"]["wall_s"], 2)}))


if __name__ == "__main__":
    main()
