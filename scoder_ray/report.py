"""`scoder-ray report RUN_DIR`: one self-contained report.html from the run store, its charts interactive
(Plotly, with plotly.js inlined once: the file opens offline, hover shows values, legends toggle series).

Per iteration: candidates, parse rate, aspect score distributions, influence distribution, kept counts;
synthesizer loss curves; stage durations and tokens/s; the final dataset and pass@k of the SCoder model
beside its base; the run's config and lineage (where the kept samples came from).
"""
from __future__ import annotations

import html
import json
from typing import Any, Optional

from scoder_ray.store import RunStore, StoreError, filesystem, read_text, write_text


def _chart(fig, height: int = 320) -> str:
    """One Plotly figure as a <div> (plotly.js itself is inlined once, in the page's head)."""
    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return ('<div class="chart">' + fig.to_html(full_html=False, include_plotlyjs=False,
                                                config={"displaylogo": False, "responsive": True}) + "</div>")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _training_table(dones: dict[str, dict], curves: dict[str, list[dict]]) -> str:
    """Per training run: steps, rows, last loss, the held-out loss (train.*.val_size: last, and lowest where
    lower), tokens/s and the share of computed positions that was padding (train.*.length_group_steps lowers it)."""
    rows = []
    for n, m in curves.items():
        d = dones[n]
        pad, best = d.get("padding"), d.get("best_eval")
        held_out = "" if d.get("eval_loss") is None else f"{d['eval_loss']:.4f} ({d.get('val_rows', '?')} rows)"
        if best and best["loss"] < d["eval_loss"]:
            held_out += f"; lowest {best['loss']:.4f} at step {best['step']}"
        rows.append([n, len(m), d.get("rows", ""), f"{m[-1]['loss']:.4f}", held_out,
                     f"{sum(x.get('tokens_per_s', 0) for x in m) / len(m):,.0f}", "" if pad is None else f"{pad:.1%}"])
    return _table(rows, ["training run", "steps", "rows", "last loss", "held-out loss", "tokens/s (mean)", "padding"])


def _read_parquet(store: RunStore, stage: str, columns: Optional[list[str]] = None):
    import pyarrow.parquet as pq

    try:
        fs, path = filesystem(store.uri(stage) + "/data")
        return pq.read_table(path, filesystem=fs, columns=columns).to_pandas()
    except (FileNotFoundError, OSError, KeyError, StoreError):
        return None


def _metrics(store: RunStore, stage: str) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in read_text(store.uri(stage) + "/metrics.jsonl").splitlines() if line]
    except (FileNotFoundError, OSError, StoreError):
        return []


def iteration_trend(store: RunStore, it: str, sample: dict, score: dict, influence: dict) -> dict[str, Any]:
    """Acceptance (kept by influence / candidates written), execution pass rate and mean weighted score."""
    verdicts = score.get("exec_verdicts", {})
    ranked = _read_parquet(store, f"{it}/rank", ["score"])
    mean = round(float(ranked["score"].dropna().mean()), 3) if ranked is not None and ranked["score"].notna().any() else ""
    return {"parse_rate": sample.get("parse_rate", ""),
            "acceptance_rate": round(influence["rows"] / sample["rows"], 4) if influence.get("rows") is not None and sample.get("rows") else "",
            "exec_pass_rate": round(verdicts.get("passed", 0) / sum(verdicts.values()), 4) if verdicts else "",
            "mean_score": mean, "mean_score_9": round(mean / 9, 4) if mean != "" else ""}


def _diversity(done: dict) -> str:
    """A stage's `diversity` (quality.diversity) in words: '0.85 / 0.90 (ratio 0.94, 64 problems each)'."""
    d = done.get("diversity") or {}
    if d.get("ratio") is None:
        return f"too few problems ({d['k']})" if d else ""
    return f"{d['distinct_3']:.2f} / {d['teacher_distinct_3']:.2f} (ratio {d['ratio']:.2f}, {d['k']} problems each)"


def sample_rows(store: RunStore, stage: str, n: int = 3) -> str:
    """A few accepted and a few rejected rows of a stage, with the reason each was dropped."""
    import pyarrow.parquet as pq

    def read(sub: str):
        try:
            fs, path = filesystem(f"{store.uri(stage)}/{sub}")
            return pq.read_table(path, filesystem=fs).to_pandas()
        except (FileNotFoundError, OSError, StoreError, ValueError):
            return None

    data, rejected = read("data"), read("rejected")
    if data is not None and "parse_ok" in data.columns and rejected is None:  # sample stages keep both in data/
        rejected, data = data[~data["parse_ok"]], data[data["parse_ok"]]
    clip = lambda t, k=300: (t[:k] + " …") if isinstance(t, str) and len(t) > k else (t or "")  # noqa: E731
    rows = []
    for label, df in (("accepted", data), ("rejected", rejected)):
        if df is None or not len(df):
            continue
        for _, r in df.head(n).iterrows():
            why = f"{r.get('reason', '')} ({clip(r.get('exec_reason'), 160)})" if r.get("exec_reason") else r.get("reason", "")
            rows.append([label, why if label == "rejected" else "", clip(r.get("problem")),
                         clip(r.get("solution")), clip(r.get("raw", "")) if label == "rejected" and not r.get("problem") else ""])
    if not rows:
        return ""
    return f"<h3>{html.escape(stage)}</h3>" + _table(rows, ["", "reason", "problem", "solution", "raw (when unparsed)"])


def plan_beside_measured(store: RunStore, dones: dict[str, dict]) -> str:
    """`scoder-ray plan`'s estimate for this run's config beside what each stage took."""
    from scoder_ray.plan import load_throughput, plan

    cfg = store.read_config()
    if cfg is None:
        return ""
    tp = load_throughput()
    rows = []
    for s in plan(cfg, tp):
        d = dones.get(s.stage)
        wall = d.get("seconds", 0) / 3600 if d and not d.get("skipped") else None
        rows.append([s.stage, s.gpus or "cpu", f"{s.wall_hours:.2f}",
                     f"{wall:.3f}" if wall is not None else "not run", f"{s.gpu_hours:.1f}" if s.gpus else "-",
                     f"{s.gpus * wall:.2f}" if s.gpus and wall is not None else "-"])
    return ("<h3>Plan beside measured</h3>" + _table(rows, ["stage", "GPUs (plan)", "wall h (plan)", "wall h (measured)",
                                                            "GPU-h (plan)", "GPU-h (measured: GPUs x wall)"])
            + f"<p>Estimates from conf/throughput.yaml ({html.escape(str(tp.get('gpu', '?')))} per GPU), as "
              "<code>scoder-ray plan</code> prints them before a run; the CPU stages' from the seed stage's measured "
              "rates on the head's CPUs and the teacher's assumed latency.</p>")


def pool_timeline(dones: dict[str, dict]) -> str:
    """When each stage's pools ran (a sampling stage's engine pools, an influence stage's feature pools; side by
    side, or one after another), with their sizes: a Gantt-like chart, seconds from the stage's first pool
    start; and the GPUs each stage held at most, as sampled while its pools ran."""
    import plotly.graph_objects as go

    bars = [(f"{n} {name}" + (f" x{w[2]}" if len(w) > 2 else ""), w[0] - min(v[0] for v in d["pools"].values()), w[1] - w[0])
            for n, d in dones.items() if d.get("pools") for name, w in d["pools"].items()]
    if not bars:
        return ""
    fig = go.Figure(go.Bar(y=[b[0] for b in bars][::-1], base=[b[1] for b in bars][::-1], x=[b[2] for b in bars][::-1],
                           orientation="h", marker_color="#55a868", hovertemplate="%{y}: %{base:.0f}-%{x:.0f}s<extra></extra>"))
    fig.update_layout(title="pools per stage (x engines or actors each)", xaxis_title="seconds from the stage's first pool start")
    held = [f"{html.escape(n)}: {d['gpus']['peak']:g} of {d['gpus']['total']:g}" for n, d in dones.items() if d.get("gpus")]
    note = f"<p>GPUs held at most while the pools ran: {'; '.join(held)}.</p>" if held else ""
    return "<h3>Pools</h3>" + _chart(fig, max(200, 40 * len(bars) + 100)) + note


def build(store: RunStore) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs
    from plotly.subplots import make_subplots

    from scoder_ray.loop import run_order

    found = {s.name: s.done for s in store.stages() if s.done}
    dones = {n: found[n] for n in run_order(list(found), store.read_config())}  # run order, not alphabetical
    iterations = sorted({n.split("/")[0] for n in dones if n.startswith("iter_")})
    parts = [f"<h1>scoder-ray run {html.escape(store.base.rsplit('/', 1)[-1])}</h1>"]
    warnings = [(n, w) for n, d in dones.items() for w in d.get("warnings", [])]
    if warnings:  # first, in words: a green number must not hide them
        parts.append("<div class='warn'><h2>Warnings</h2><ul>" + "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(w)}</li>" for n, w in warnings) + "</ul></div>")

    # -- overview: stage durations and throughput
    names = [n for n in dones if "/features/" not in n]
    rows = []
    for n in names:
        d = dones[n]
        # A resumed stage's tokens include what its interrupted attempt wrote, its seconds only the rerun's.
        resumed = d.get("resumed_rows", 0)
        tps = f"{d['tokens'] / d['seconds']:.0f}" if d.get("tokens") and d.get("seconds") and not resumed else ""
        starts = f"{d['engine_start_s']:.1f}" if d.get("engine_start_s") else ""
        out = f"{d.get('rows', '')} (resumed: {resumed} rows written before an interruption)" if resumed else d.get("rows", "")
        rows.append([n, out, f"{d.get('seconds', 0):.1f}", starts, tps, d.get("started_at", ""), d.get("finished_at", "")])
    parts.append("<h2>Stages</h2>" + _table(rows, ["stage", "rows out", "seconds (sub-stages included)",
                                                   "engine start-up s (summed over engines)",
                                                   "tokens/s (wall, start-ups included)", "started", "finished"]))
    feature_rows = [[n, part, f"{s:.1f}"] for n in names for part, s in dones[n].get("feature_seconds", {}).items()]
    if feature_rows:  # the influence stage's seconds include these
        parts.append("<h3>Influence time per checkpoint and kind</h3>" + _table(feature_rows, ["stage", "features",
                                                                                             "seconds"]))
    parts.append(plan_beside_measured(store, dones))
    fig = go.Figure(go.Bar(y=names[::-1], x=[dones[n].get("seconds", 0) for n in names[::-1]], orientation="h",
                           marker_color="#4c72b0", customdata=[dones[n].get("rows", "") for n in names[::-1]],
                           hovertemplate="%{y}: %{x:.1f} s, %{customdata} rows<extra></extra>"))
    fig.update_layout(title="stage durations (run order)", xaxis_title="seconds")
    parts.append(_chart(fig, max(260, 22 * len(names) + 100)))
    parts.append(pool_timeline(dones))

    # -- per iteration
    if iterations:
        parts.append("<h2>Iterations</h2>")
        rows, trend = [], []
        for it in iterations:
            s, r, inf = dones.get(f"{it}/sample", {}), dones.get(f"{it}/rank", {}), dones.get(f"{it}/influence", {})
            sc = dones.get(f"{it}/score", {})
            t = iteration_trend(store, it, s, sc, inf)
            trend.append(t)
            judge = "degenerate" if sc.get("judge_signal", {}).get("degenerate") else "ok" if sc.get("judge_signal") else ""
            rows.append([it, s.get("rows", ""), s.get("parse_rate", ""), sc.get("rows", ""), r.get("rows", ""),
                         inf.get("rows", ""), t["acceptance_rate"], t["exec_pass_rate"], t["mean_score"], judge,
                         dones.get(f"{it}/train_data", {}).get("rows", "")])
        parts.append(_table(rows, ["iteration", "candidates", "parse rate", "scored", "selected", "kept (influence)",
                                   "acceptance rate", "exec pass rate", "mean score", "judge", "training rows"]))
        if len(trend) > 1:
            fig = go.Figure([go.Scatter(x=iterations, y=[t[key] if t[key] != "" else None for t in trend],
                                        mode="lines+markers", name=key)
                             for key in ("parse_rate", "acceptance_rate", "exec_pass_rate", "mean_score_9")])
            fig.update_layout(title="trends across iterations (mean score / 9)", yaxis_range=[0, 1.05])
            parts.append(_chart(fig, 300))
        for it in iterations:
            scored = _read_parquet(store, f"{it}/score")
            aspects = [c for c in scored.columns if c.startswith("aspect_") and c != "aspects_fallback"] if scored is not None else []
            infl = _read_parquet(store, f"{it}/influence", ["influence", "kept"])
            cols = len(aspects) + (1 if infl is not None and len(infl) else 0)
            if not cols:
                continue
            titles = [a.replace("aspect_", "") for a in aspects] + (["influence"] if cols > len(aspects) else [])
            fig = make_subplots(rows=1, cols=cols, subplot_titles=titles)
            for i, a in enumerate(aspects, 1):
                vals = scored[a][scored[a] >= 0]
                fig.add_trace(go.Histogram(x=vals, xbins={"start": -0.5, "end": 9.5, "size": 1}, marker_color="#55a868",
                                           name=a.replace("aspect_", ""), showlegend=False), row=1, col=i)
            if cols > len(aspects):
                for kept, color in ((False, "#bbbbbb"), (True, "#c44e52")):
                    fig.add_trace(go.Histogram(x=infl["influence"][infl["kept"] == kept], nbinsx=20, marker_color=color,
                                               name="kept" if kept else "dropped"), row=1, col=cols)
            fig.update_layout(title=f"{it}: aspect scores (0-9) and influence", barmode="stack")
            parts.append(_chart(fig, 280))

    # -- what the teacher cost
    boot = dones.get("bootstrap", {})
    if boot.get("usage", {}).get("requests_sent") or boot.get("usage", {}).get("cache_hits"):
        u, price = boot["usage"], boot.get("price", {})
        parts.append("<h2>Teacher</h2>" + _table(
            [[boot.get("teacher", {}).get("model", ""), u.get("requests_sent", 0), u.get("cache_hits", 0),
              u.get("retries", 0), json.dumps(u.get("errors", {})), u.get("prompt_tokens_paid", 0),
              u.get("completion_tokens_paid", 0), f"${boot.get('estimated_cost_usd', 0):.4f}",
              f"{price.get('in_per_mtok', '?')} / {price.get('out_per_mtok', '?')} ({price.get('source', '?')})",
              f"{ex.get('passed', 0)} of {ex['ran']}" if (ex := boot.get("execution", {})).get("ran") else "not run"]],
            ["model", "requests sent", "cache hits", "retries", "errors", "prompt tokens paid", "completion tokens paid",
             "estimated cost", "USD per M tokens in / out (source)", "samples passing the sandbox"]))

    # -- the data itself: accepted and rejected rows with their reasons
    examples = []
    for stage in ["bootstrap"] + [f"{it}/sample" for it in iterations] + ["final"]:
        if stage in dones:
            examples.append(sample_rows(store, stage))
    if any(examples):
        parts.append("<h2>Samples</h2>" + "".join(e for e in examples if e))

    # -- training curves
    train_stages = [n for n in dones if n in ("train_synthesizer", "train_scoder") or n.endswith(("/train", "/warmup"))]
    curves = {n: _metrics(store, n) for n in train_stages}
    curves = {n: m for n, m in curves.items() if m}
    if curves:  # one chart per training run: their steps are not one axis
        rows_n = -(-len(curves) // 2)
        fig = make_subplots(rows=rows_n, cols=2, subplot_titles=list(curves))
        for i, (n, m) in enumerate(curves.items()):
            fig.add_trace(go.Scatter(x=[x["step"] for x in m], y=[x["loss"] for x in m], mode="lines", name=n,
                                     line={"color": "#1f77b4"}, showlegend=False), row=i // 2 + 1, col=i % 2 + 1)
            held_out = [x for x in m if "eval_loss" in x]
            if held_out:  # train.*.val_size: the loss on rows the run never trained on
                fig.add_trace(go.Scatter(x=[x["step"] for x in held_out], y=[x["eval_loss"] for x in held_out],
                                         mode="lines+markers", name="held-out", line={"color": "#d62728"},
                                         showlegend=False), row=i // 2 + 1, col=i % 2 + 1)
        fig.update_yaxes(type="log", title_text="loss")
        fig.update_xaxes(title_text="step")
        fig.update_layout(title="loss per training run: training (blue), held-out rows (red; train.*.val_size)")
        parts.append("<h2>Training</h2>" + _chart(fig, 260 * rows_n + 60) + _training_table(dones, curves))

    # -- final dataset, evaluation, lineage
    final = dones.get("final")
    if final:
        parts.append("<h2>Final dataset</h2>" + _table(
            [[final["rows"], final.get("target"), final.get("generated"), final.get("parse_rate"),
              f"{final.get('seeds_yielding', '?')} of {final.get('seeds', '?')}", final.get("duplicates"),
              json.dumps(final.get("rejected", {})), json.dumps(final.get("audit", {})), _diversity(final),
              final.get("dataset_digest", "")]],
            ["samples", "target", "generated", "parse rate", "seeds with an accepted sample", "duplicates",
             "rejected (by reason)", "audit of the kept rows", "problem diversity (distinct 3-grams: these / teacher's)",
             "digest"]))
    ev = dones.get("evaluate")
    if ev:
        rows = [[model, bench, ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float))]
                for model, by_bench in ev["results"].items() for bench, scores in by_bench.items()]
        parts.append("<h2>Evaluation</h2>" + _table(rows, ["model", "benchmark", "pass@k; share of verdicts decided "
                                                                                 "outside the program"]) +
                     f"<p>{ev.get('num_samples')} sample(s) per problem, temperature {ev.get('temperature')}, "
                     f"limit {ev.get('limit') or 'none'}.</p>")
    lineage = [[it, json.dumps(dones[f"{it}/train_data"].get("by_origin", {})), _diversity(dones[f"{it}/train_data"])]
               for it in iterations if f"{it}/train_data" in dones]
    if lineage:
        parts.append("<h2>Lineage</h2>" + _table(lineage, ["iteration", "training rows by origin",
                                                           "kept problems' diversity (distinct 3-grams: kept / teacher's)"]))
    try:
        config = read_text(store.file_uri("config.yaml"))
    except (FileNotFoundError, OSError):
        config = ""
    parts.append(f"<h2>Config</h2><pre>{html.escape(config)}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top;white-space:pre-wrap}"
             ".warn{border:2px solid #c44e52;background:#fff3f3;padding:0 1em}pre{background:#f6f6f6;padding:1em;font-size:12px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>scoder-ray report</title><style>{style}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>{''.join(parts)}</body></html>")


def write_report(store: RunStore) -> str:
    """Write `<run>/report.html`; returns its URI."""
    uri = store.file_uri("report.html")
    write_text(uri, build(store))
    return uri


BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    """A headless Chromium on PATH."""
    import shutil

    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    raise FileNotFoundError("no headless Chromium on PATH (one of " + ", ".join(BROWSERS) + "): on Debian/Ubuntu "
                            "`apt-get install chromium-headless-shell` (make setup does, as root)")


def render(html_path: str, screenshot: Optional[str] = None, width: int = 1200, height: int = 3200) -> str:
    """Open a local HTML file in headless Chromium, scripts run: its DOM after rendering, or (with
    `screenshot`) a PNG of the page at that path."""
    import subprocess
    from pathlib import Path

    out = ["--screenshot=" + screenshot] if screenshot else ["--dump-dom"]
    args = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
            "--virtual-time-budget=20000", *out, Path(html_path).resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed on {html_path} ({done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def screenshot(store: RunStore) -> str:
    """`<run>/report.png`: the report as headless Chromium draws it; returns its URI."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scoder-report-") as d:
        page = f"{d}/report.html"
        with open(page, "w", encoding="utf-8") as f:
            f.write(read_text(store.file_uri("report.html")))
        render(page, screenshot=f"{d}/report.png")
        with open(f"{d}/report.png", "rb") as f:
            data = f.read()
    fs, path = filesystem(store.file_uri("report.png"))
    with fs.open_output_stream(path) as f:
        f.write(data)
    return store.file_uri("report.png")
