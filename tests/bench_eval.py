"""Evaluation wall time, old against new, on one trained `cpu`-profile run (not a pytest test).

The `cpu` profile's evaluation set, as `experiments._evaluate` runs it: `generate` on the 5-task mix (30 rows per label
task at <= 16 new tokens, 8 GSM8K rows at <= 96), `loglik` on its four tasks with choices (320 rows each) and `bbh` (2 rows
per subtask, <= 24 new tokens). Up to four evaluations of the same trained adapters, each on its own in-memory model:
  - `old`: lm-eval's `HFLM` on the unmerged adapters (merge, shared_prompt, prefix_cache, contiguous_head off) over fp32
    base weights: the evaluation before `dtype="auto"` and the rewrites below;
  - `old@<dtype>`: the same lm-eval path at the run's dtype (bf16 where the CPU has bf16 matrix units; left out where
    that is fp32): `new` against it isolates the rewrites from the dtype;
  - `new`: `evaluate`'s defaults at the run's dtype, what `experiments.run` evaluates with: one packed forward per
    loglik row and a contiguous input to the output layer; where the weights are fp32 also the adapters merged and
    `prefix_cache` (shared prefixes run once, greedy generation by `batch_greedy`);
  - `new@<old dtype>`: the same defaults over the `old` evaluation's weights (left out where that is the run's dtype).
The pairs at one dtype (`old` / `new@<old dtype>`, `old@<dtype>` / `new`) give the rewrites' speed-up at that dtype,
with their agreement row for row, and a bound on it: loglik's prefill runs at the machine's matrix rate, so even with
generation free the speed-up is at most old's total over new's loglik time.
Variants are interleaved per repeat (the CPU is shared; contention hits all alike); medians reported. Per call, the time
spent in the decoder's forwards is split into prefill (> 1 token per row) and decode (1 token per row), with the tokens
fed and the real (non-padding) ones; the rest is the output layer, log-softmax and lm-eval (task building, requests).
Agreement: per row, each evaluation's prediction against `new`'s (generate: the generated text; loglik: the chosen
choice), every difference listed with what explains it: for loglik both evaluations' margins between the best and the
second-best choice (a flip at a margin the size of bf16 rounding is a near-tie), for generate both texts and whether
each scored correct.

Run: HF_HUB_OFFLINE=1 ALIGNLORA_DATA=../shared/data .venv/bin/python tests/bench_eval.py --runs /tmp/runs [--repeats 2]
(trains the `cpu` profile's `lora` run into --runs first if it is not there: about 1-10 min on 2 shared cores)
"""
import argparse, collections, json, os, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alignlora.data import PAPER_TASKS
from alignlora.eval import evaluate
from alignlora.experiments import load_run, make_eval, make_spec, run

LM_EVAL_PATH = dict(merge=False, shared_prompt=False, prefix_cache=False, contiguous_head=False)   # lm-eval's HFLM as it is
REWRITES = dict()            # evaluate's defaults: what `experiments.run` evaluates with (prefix_cache: on fp32 weights)


class Timer:
    "Forward hooks on the decoder: seconds, calls and tokens of prefill (> 1 token per row) and decode forwards."
    def __init__(self, model, pad_id):
        self.s, self.pad = collections.Counter(), pad_id
        dec = model.get_decoder()
        dec.register_forward_pre_hook(self.pre, with_kwargs=True); dec.register_forward_hook(self.post, with_kwargs=True)
    def pre(self, mod, args, kw):
        ids = kw.get("input_ids", args[0] if args else None); am = kw.get("attention_mask")
        b, L = ids.shape; self.kind = "prefill" if L > 1 else "decode"
        real = int(am[:, -L:].sum()) if am is not None and am.dim() == 2 else int(((ids != 0) & (ids != self.pad)).sum())
        self.s[self.kind + "_calls"] += 1; self.s[self.kind + "_tok"] += b * L; self.s[self.kind + "_real"] += real
        self.t0 = time.perf_counter()
    def post(self, mod, args, kw, out): self.s[self.kind + "_s"] += time.perf_counter() - self.t0


def calls(e):
    "The `evaluate` calls `experiments._evaluate` makes for EvalSpec `e`: [(tasks, limit, max_new_tokens)]."
    limits, caps, groups = dict(e.limits), dict(e.caps), {}
    for t in e.tasks: groups.setdefault((limits.get(t, e.limit), caps.get(t, e.max_new_tokens)), []).append(t)
    return [(ts, lim, cap) for (lim, cap), ts in groups.items()]


def evaluate_set(model, tok, e, kwargs, data_dir):
    "Wall time, per-row predictions `{(task, doc_id): prediction}`, log-likelihoods and scores of one set."
    preds, lls, accs, wall = {}, {}, {}, 0.0
    for ts, lim, cap in calls(e):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            evaluate(model, tok, ts, protocol=e.protocol, limit=lim, batch_size=e.batch_size, data_dir=data_dir,
                     max_new_tokens=cap, progress=False, output_dir=out, **kwargs)
            wall += time.perf_counter() - t0
            for s in map(json.loads, open(Path(out) / "samples.jsonl")):
                if s.get("filter", "none") != "none" and e.protocol == "loglik": continue
                k = (s["task"], s["doc_id"]); accs[k] = bool(s.get("acc"))
                if e.protocol == "loglik":
                    ll = [float(r[0][0]) for r in s["resps"]]; lls[k] = ll; preds[k] = max(range(len(ll)), key=ll.__getitem__)
                else: preds[k] = s["filtered_resps"][0]
    return wall, preds, lls, accs


def margin(ll):
    "Best minus second-best log-likelihood of one row's choices."
    top = sorted(ll, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def explain(name, k, old, new):
    "One line on a row where evaluation `old` and `new` disagree."
    (po, llo, ao), (pn, lln, an) = old, new
    if llo: return (f"    {k}: choice {po[k]} -> {pn.get(k)}; margin {margin(llo[k]):.3f} -> {margin(lln[k]):.3f} nats; "
                    f"correct {ao[k]} -> {an.get(k)}")
    return f"    {k}: {po[k][:60]!r} (correct {ao[k]}) -> {pn.get(k, '')[:60]!r} (correct {an.get(k)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=os.environ.get("ALIGNLORA_RUNS", "runs"), help="run cache folder")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sets", default="generate,loglik,bbh")
    ap.add_argument("--old-dtype", default="float32", help="base weights of the `old` evaluation")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data_dir = os.environ.get("ALIGNLORA_DATA")
    spec = make_spec("cpu", a.method, PAPER_TASKS)
    run(spec, runs_dir_=a.runs, data_dir=data_dir)          # trains it unless cached
    models = {"old": (load_run(spec, a.runs, dtype=a.old_dtype), LM_EVAL_PATH)}
    if spec.dtype != a.old_dtype: models[f"old@{spec.dtype}"] = (load_run(spec, a.runs), LM_EVAL_PATH)
    models["new"] = (load_run(spec, a.runs), REWRITES)
    if spec.dtype != a.old_dtype: models[f"new@{a.old_dtype}"] = (load_run(spec, a.runs, dtype=a.old_dtype), REWRITES)
    print(f"run {spec.label} ({spec.key}), dtype {spec.dtype}; old at {a.old_dtype}; {torch.get_num_threads()} threads", flush=True)
    timers = {v: Timer(m, t.pad_token_id) for v, ((m, t), _) in models.items()}
    sets = {"generate": make_eval("cpu", PAPER_TASKS, "generate"),
            "loglik": make_eval("cpu", [t for t in PAPER_TASKS if t != "gsm8k"], "loglik"),
            "bbh": make_eval("cpu", ["bbh"], "generate")}
    walls, split, first = collections.defaultdict(list), {}, {}
    for rep in range(a.repeats):
        for name in a.sets.split(","):
            for v in (list(models) if rep % 2 == 0 else list(models)[::-1]):
                (model, tok), kw = models[v]; s = timers[v].s; s.clear()
                w, p, ll, acc = evaluate_set(model, tok, sets[name], kw, data_dir)
                walls[name, v].append(w); split[name, v] = collections.Counter(s); first.setdefault((name, v), (p, ll, acc))
                fw = s.get("prefill_s", 0) + s.get("decode_s", 0)
                print(f"repeat {rep} {name:8s} {v:14s}: {w:6.1f} s = prefill {s['prefill_s']:5.1f} s ({s['prefill_calls']} calls, "
                      f"{s['prefill_tok']} tokens, {s['prefill_real']} real) + decode {s['decode_s']:5.1f} s "
                      f"({s['decode_calls']} calls, {s['decode_tok']} tokens) + rest {w - fw:5.1f} s", flush=True)
    print("\nset       variant          wall_s  speed-up of new  identical to new  accuracy  (medians over repeats)")
    tot = collections.Counter()
    for name in a.sets.split(","):
        new = first[name, "new"]; n = statistics.median(walls[name, "new"])
        for v in models:
            o = statistics.median(walls[name, v]); tot[v] += o
            p = first[name, v][0]; same = sum(p[k] == new[0].get(k) for k in p)
            print(f"{name:8s}  {v:14s} {o:7.1f} {o / n:9.2f}x {same:9d}/{len(p)} {100 * statistics.mean(first[name, v][2].values()):9.1f}")
        for v in models:
            if v == "new": continue
            diff = sorted(k for k in first[name, v][0] if first[name, v][0][k] != new[0].get(k))
            if diff: print(f"  {name}: {len(diff)} rows where {v} and new differ:")
            for k in diff: print(explain(name, k, first[name, v], new))
            if first[name, v][1]:
                llo, lln = first[name, v][1], new[1]
                print(f"  {name}: {v} vs new, max |Δ log-likelihood| over all choices: "
                      f"{max(abs(x - y) for k in llo for x, y in zip(llo[k], lln[k])):.2e}")
    print(f"\n{'all':8s}  " + "  ".join(f"{v} {tot[v]:.1f} s ({tot[v] / tot['new']:.2f}x of new)" for v in models))
    same_dtype = [(o, n) for o, n in (("old", f"new@{a.old_dtype}"), (f"old@{spec.dtype}", "new")) if o in models and n in models]
    if spec.dtype == a.old_dtype: same_dtype = [("old", "new")]   # no bf16 units: old and new share the dtype
    for o, n in same_dtype:   # the rewrites alone, at one dtype: speed-up and agreement
        print(f"\nrewrites at one dtype: {o} against {n}")
        for name in a.sets.split(","):
            po, pn = first[name, o][0], first[name, n][0]
            diff = sorted(k for k in po if po[k] != pn.get(k))
            print(f"  {name:8s}: {statistics.median(walls[name, o]):6.1f} s / {statistics.median(walls[name, n]):6.1f} s = "
                  f"{statistics.median(walls[name, o]) / statistics.median(walls[name, n]):.2f}x, identical {len(po) - len(diff)}/{len(po)}")
            if n != "new":   # the new-dtype pair's differences are listed above
                for k in diff: print(explain(name, k, first[name, o], first[name, n]))
        print(f"  all     : {tot[o]:.1f} s / {tot[n]:.1f} s = {tot[o] / tot[n]:.2f}x")
        if "loglik" in a.sets.split(","):   # what the rewrites could reach at this dtype: loglik's prefill is compute-bound
            print(f"  bound   : were generation free, {tot[o]:.1f} s / {statistics.median(walls['loglik', n]):.1f} s (loglik "
                  f"alone) = {tot[o] / statistics.median(walls['loglik', n]):.2f}x at most")
    print("\nforward split of the last repeat (decoder forwards; 'rest' = output layer, log-softmax, lm-eval):")
    for (name, v), s in split.items():
        fw = s.get("prefill_s", 0) + s.get("decode_s", 0); w = walls[name, v][-1]
        print(f"  {name:8s} {v:14s}: wall {w:5.1f} s = prefill {s['prefill_s']:5.1f} s ({s['prefill_calls']} calls, "
              f"{s['prefill_tok']} tokens, {s['prefill_real']} real) + decode {s['decode_s']:5.1f} s ({s['decode_calls']} calls, "
              f"{s['decode_tok']} tokens) + rest {w - fw:5.1f} s")


if __name__ == "__main__":
    main()
