"""The figures of a scaling study (``hpcdqn scale``): ``scaling.png`` (throughput, efficiency and
the time split against ranks; the model's prediction dashed with its band, extrapolation beyond
8x the largest fitted rank count shaded and labelled; oversubscribed points marked) and
``allreduce.png`` (the Allreduce sweep with its spread and the model fitted without the largest
rank count, drawn dashed at the held-out one)."""

from __future__ import annotations

import math
from pathlib import Path

from hpcdqn.cluster.costmodel import EXTRAPOLATION_FACTOR, LABEL, t_allreduce

SPLIT_COLORS = {"compute": "C0", "allreduce": "C3", "wait": "C1", "bubble": "C4", "other": "0.7"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _log2_axis(a, xmax, matplotlib) -> None:
    from matplotlib.ticker import FuncFormatter

    a.set_xscale("log", base=2)
    a.set_xticks([2 ** k for k in range(int(math.log2(max(2, xmax))) + 1)])
    a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    a.set_xlabel("MPI ranks")
    a.grid(True, which="both", alpha=0.3)


def _measured(a, rows, summ, key, color) -> None:
    """Repeats as dots, medians with p25-p75 bars; oversubscribed medians as open markers."""
    a.scatter([r["ranks"] for r in rows], [r[key] for r in rows], s=10, color=color, alpha=0.4,
              zorder=3)
    ps = [s["ranks"] for s in summ]
    med = [s[key] for s in summ]
    err = [[m - s[f"{key}_p25"] for m, s in zip(med, summ)],
           [s[f"{key}_p75"] - m for m, s in zip(med, summ)]]
    a.errorbar(ps, med, yerr=err, fmt="-", color=color, capsize=3, zorder=4,
               label="measured (median, p25-p75)")
    for s in summ:
        a.plot(s["ranks"], s[key], "o", color=color, zorder=5,
               mfc="white" if s["oversubscribed"] else color)
    if any(s["oversubscribed"] for s in summ):
        a.plot([], [], "o", color=color, mfc="white", label="oversubscribed (ranks > cores)")


def _predicted(a, pred, key, fitted_max, unfitted, band=None) -> None:
    """The model dashed with its band; the extrapolated range shaded."""
    if not pred:
        return
    px = [q["ranks"] for q in pred]
    inside = [q for q in pred if not q["beyond_measured_nodes"]]
    a.plot([q["ranks"] for q in inside], [q[key] for q in inside], "--", color="C3", label=LABEL)
    beyond = [q for q in pred if q["beyond_measured_nodes"]]
    if beyond:
        a.plot([q["ranks"] for q in inside[-1:] + beyond], [q[key] for q in inside[-1:] + beyond],
               ":", color="C3", lw=1.5,
               label=f"{LABEL}, more nodes than measured"
                     + (" (no between-node data: intra-node terms only)"
                        if "beta_net" in unfitted else ""))
    if band is not None and f"{key}_low" in pred[0]:    # no held-out test: no band to draw
        a.fill_between(px, [q[f"{key}_low"] for q in pred], [q[f"{key}_high"] for q in pred],
                       color="C3", alpha=0.12, label="band: +-held-out error of the allreduce")
    lim = EXTRAPOLATION_FACTOR * fitted_max
    if max(px) > lim:
        a.axvspan(lim, max(px) * 1.05, color="0.5", alpha=0.15, hatch="//",
                  label=f"extrapolation (> {EXTRAPOLATION_FACTOR}x largest fitted p={fitted_max})")


def plot_scaling(path: Path, rows, info) -> None:
    matplotlib, plt = _pyplot()
    summ, pred, meta = info["measured"], info["rows"], info["meta"]
    fitted_max = max(info["coef"].get("ranks") or [1])
    p0, thr0 = summ[0]["ranks"], summ[0]["env_steps_per_s"]
    xmax = max([s["ranks"] for s in summ] + [q["ranks"] for q in pred])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 5.8))
    a1.plot([p0, xmax], [thr0, thr0 * xmax / p0], ":", color="k", lw=1, label="ideal (linear)")
    _measured(a1, rows, summ, "env_steps_per_s", "C0")
    _predicted(a1, pred, "env_steps_per_s", fitted_max, info["coef"]["unfitted"],
               info.get("band_rel"))
    a2.axhline(1.0, ls=":", color="k", lw=1, label="ideal")
    _measured(a2, rows, summ, "efficiency", "C1")
    _predicted(a2, pred, "efficiency", fitted_max, info["coef"]["unfitted"], info.get("band_rel"))
    for a in (a1, a2):
        _log2_axis(a, xmax, matplotlib)
    handles, labels = a2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower left", ncol=3, fontsize=7, frameon=False,
               bbox_to_anchor=(0.04, 0.0))
    a1.set_yscale("log")
    a1.set_ylabel("env steps / s (all ranks)")
    a1.set_title(f"{meta['mode']} scaling: throughput")
    a2.set_ylabel(f"efficiency (vs {p0} rank{'s' if p0 > 1 else ''})")
    a2.set_ylim(0, max(1.2, max(r["efficiency"] for r in rows) * 1.1))
    a2.set_title(f"{meta['mode']} scaling: efficiency")
    _time_split(a3, summ)
    fig.suptitle(_subtitle(info), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_split(a, summ) -> None:
    """Stacked median shares of the wall time per rank count."""
    labels = [f"{s['ranks']}{'*' if s['oversubscribed'] else ''}" for s in summ]
    bottom = [0.0] * len(summ)
    for k, color in SPLIT_COLORS.items():
        v = [s[f"{k}_share"] for s in summ]
        a.bar(labels, v, bottom=bottom, color=color, label=k, width=0.6)
        bottom = [b + x for b, x in zip(bottom, v)]
    a.set_ylim(0, 1.0)
    a.set_ylabel("share of wall time")
    a.set_xlabel("MPI ranks" + ("   (* oversubscribed: ranks > cores)"
                                if any(s["oversubscribed"] for s in summ) else ""))
    a.set_title("time split (median over repeats, mean over ranks)")
    a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _subtitle(info) -> str:
    meta, c, t = info["meta"], info["coef"], info["held_out"]
    sub = (f"{meta.get('env_id', '')}, pp={meta['pp']}, host {meta.get('host', '?')}, "
           f"launcher {meta.get('launcher', '?')}, {meta.get('cores', '?')} cores")
    load = meta.get("loadavg_1m")
    if load and None not in load:
        sub += f", load avg {load[0]:g}->{load[1]:g}"
    sub += (f"\n{LABEL}: t0={c['t0'] * 1e6:.2f}us, alpha={c['alpha'] * 1e6:.2f}us*log2(q), "
            f"beta={c['beta'] * 1e9:.3f}ns/B*2(q-1)/q*n"
            + (", between-node terms not measured" if "beta_net" in c.get("unfitted", []) else "")
            + (f", straggler sigma={1e6 * info['straggler_sigma_s']:.1f}us"
               if info["straggler_sigma_s"] is not None else ", straggler not fitted (no dp > 1)"))
    if t:
        g = t["rel_err_at_grad_bytes"]
        sub += (f"\nheld-out test: fitted on p={t['fitted_on_ranks']}, predicting p="
                f"{t['held_out_ranks']}: median |error| {100 * t['median_abs_rel_err']:.0f}% over "
                f"sizes" + (f", {100 * g:+.0f}% at the gradient's size" if g is not None else ""))
    elif info.get("held_out_skipped"):
        sub += "\nheld-out test " + info["held_out_skipped"].split(";")[0]
    return sub


def plot_sweep(path: Path, bench_rows, info) -> None:
    """Allreduce time against message size per rank count: medians with p25-p75 bars, and the
    model fitted without the largest rank count (dashed where it predicts the held-out one)."""
    _, plt = _pyplot()
    t = info["held_out"]
    coef = t["coef"] if t else info["coef"]
    fig, a = plt.subplots(figsize=(8, 5.5))
    for i, p in enumerate(sorted({b["ranks"] for b in bench_rows})):
        pts = sorted((b for b in bench_rows if b["ranks"] == p), key=lambda b: b["n_bytes"])
        n = [b["n_bytes"] for b in pts]
        med = [b["median_s"] for b in pts]
        over = pts[0].get("oversubscribed")
        a.errorbar(n, med, yerr=[[m - b["p25_s"] for m, b in zip(med, pts)],
                                 [b["p75_s"] - m for m, b in zip(med, pts)]],
                   fmt="o", ms=4, color=f"C{i}", mfc="white" if over else f"C{i}", capsize=2,
                   label=f"p={p} measured{' (oversubscribed)' if over else ''}")
        held = t is not None and p == t["held_out_ranks"]
        a.plot(n, [t_allreduce(p, x, coef, b.get("ranks_per_node")) for x, b in zip(n, pts)],
               "--" if held else "-", color=f"C{i}", lw=1,
               label=f"p={p} model{' (held out: predicted)' if held else ' (fitted)'}")
    grad = (info["meta"].get("grad_bytes") or 0) // info["meta"]["pp"]
    if grad:
        a.axvline(grad, color="k", lw=0.8, ls=":", label=f"gradient ({grad} B)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("message size (bytes, float32 SUM, in place)")
    a.set_ylabel("Allreduce time, slowest rank (s)")
    title = "Allreduce sweep (median, p25-p75)"
    if t:
        title += (f"; model fitted on p={t['fitted_on_ranks']}, held-out p={t['held_out_ranks']}: "
                  f"median |error| {100 * t['median_abs_rel_err']:.0f}%")
    a.set_title(title, fontsize=8)
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roles(path: Path, rows, model) -> None:
    """``hpcdqn scale --mode roles``: env frames/s against actor ranks (runs as dots, medians
    joined, the model's prediction per run as crosses, held-out ones labelled), and the median
    time split of each role per actor count."""
    import statistics

    matplotlib, plt = _pyplot()
    counts = sorted({r["actors"] for r in rows})
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 5.2))
    a1.scatter([r["actors"] for r in rows], [r["env_steps_per_s"] for r in rows], s=12,
               color="C0", alpha=0.5, label="measured (each run)")
    med = [statistics.median(r["env_steps_per_s"] for r in rows if r["actors"] == n) for n in counts]
    a1.plot(counts, med, "-o", color="C0", label="measured (median)")
    for role, marker in (("constants", "s"), ("efficiencies", "^"), ("held out", "x")):
        g = [r for r in rows if r["model_role"] == role]
        if g:
            a1.scatter([r["actors"] for r in g], [r["predicted_env_steps_per_s"] for r in g],
                       marker=marker, color="C3", s=40, label=f"model ({role})")
    err = model["held_out_median_abs_rel_err"]
    a1.set_title("env frames/s: measured and the cost model with roles"
                 + (f"\nheld-out median |error| {100 * err:.1f}%" if err is not None else ""),
                 fontsize=9)
    a1.set_xlabel("actor ranks" + ("   (* oversubscribed: ranks > cores)"
                                   if any(r["oversubscribed"] for r in rows) else ""))
    a1.set_ylabel("env frames / s")
    a1.set_ylim(0, 1.15 * max([r["env_steps_per_s"] for r in rows]
                              + [r["predicted_env_steps_per_s"] for r in rows]))
    a1.set_xticks(counts)
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    for a, role, keys in ((a2, "actor", ("env", "inference", "send", "wait")),
                          (a3, "learner", ("receive_insert", "wait_data", "sample", "update",
                                           "allreduce"))):
        labels = [f"{n}{'*' if any(r['oversubscribed'] for r in rows if r['actors'] == n) else ''}"
                  for n in counts]
        bottom = [0.0] * len(counts)
        for i, k in enumerate(keys):
            v = [statistics.median(r[f"{role}_{k}_share"] for r in rows if r["actors"] == n)
                 for n in counts]
            a.bar(labels, v, bottom=bottom, color=f"C{i}", label=k, width=0.6)
            bottom = [b + x for b, x in zip(bottom, v)]
        a.bar(labels, [max(0.0, 1.0 - b) for b in bottom], bottom=bottom, color="0.8",
              label="other", width=0.6)
        a.set_ylim(0, 1.05)
        a.set_xlabel("actor ranks")
        a.set_ylabel("share of the rank's wall time")
        a.set_title(f"{role} ranks: time split (median over repeats, mean over ranks)", fontsize=9)
        a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
