"""Evaluation wall time, old against new, on one trained `cpu`-profile run (not a pytest test).

The `cpu` profile's evaluation set, as `experiments._evaluate` runs it: `generate` on the 5-task mix (30 rows per label
task at ≤ 16 new tokens, 8 GSM8K rows at ≤ 96), `loglik` on its four tasks with choices (30 rows each) and `bbh` (2 rows
per subtask, ≤ 24 new tokens). Two variants of `alignlora.eval.evaluate` on the same in-memory model:
  - `old`: merge=False, shared_prompt=False, prefix_cache=False (lm-eval's `HFLM` on the unmerged adapters);
  - `new`: merge, shared_prompt and prefix_cache on (adapters merged for the call, one packed forward per loglik row,
    BBH's shared prefix once).
Variants are interleaved per repeat (the CPU is shared; contention hits both alike); medians reported. Per call, the time
spent in the decoder's forwards is split into prefill (> 1 token per row) and decode (1 token per row), with the tokens
fed and the real (non-padding) ones; the rest is the output layer, log-softmax and lm-eval (task building, requests).
Agreement: per row, old and new predictions compared (generate: the generated text; loglik: the chosen choice), every
difference printed; loglik also gives the largest |Δ log-likelihood| over all choices.

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

VARIANTS = {"old": dict(merge=False, shared_prompt=False, prefix_cache=False), "new": dict(prefix_cache=True)}


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


def evaluate_set(model, tok, e, variant, data_dir):
    "Wall time, per-row predictions `{(task, doc_id): prediction}`, log-likelihoods and the forward split of one set."
    preds, lls, wall = {}, {}, 0.0
    for ts, lim, cap in calls(e):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            evaluate(model, tok, ts, protocol=e.protocol, limit=lim, batch_size=e.batch_size, data_dir=data_dir,
                     max_new_tokens=cap, progress=False, output_dir=out, **VARIANTS[variant])
            wall += time.perf_counter() - t0
            for s in map(json.loads, open(Path(out) / "samples.jsonl")):
                if s.get("filter", "none") != "none" and e.protocol == "loglik": continue
                k = (s["task"], s["doc_id"])
                if e.protocol == "loglik":
                    ll = [float(r[0][0]) for r in s["resps"]]; lls[k] = ll; preds[k] = max(range(len(ll)), key=ll.__getitem__)
                else: preds[k] = s["filtered_resps"][0]
    return wall, preds, lls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=os.environ.get("ALIGNLORA_RUNS", "runs"), help="run cache folder")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sets", default="generate,loglik,bbh")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data_dir = os.environ.get("ALIGNLORA_DATA")
    spec = make_spec("cpu", a.method, PAPER_TASKS)
    run(spec, runs_dir_=a.runs, data_dir=data_dir)          # trains it unless cached
    model, tok = load_run(spec, a.runs)
    timer = Timer(model, tok.pad_token_id)
    sets = {"generate": make_eval("cpu", PAPER_TASKS, "generate"),
            "loglik": make_eval("cpu", [t for t in PAPER_TASKS if t != "gsm8k"], "loglik"),
            "bbh": make_eval("cpu", ["bbh"], "generate")}
    walls, split, first = collections.defaultdict(list), {}, {}
    for rep in range(a.repeats):
        for name in a.sets.split(","):
            for v in (VARIANTS if rep % 2 == 0 else list(VARIANTS)[::-1]):
                timer.s.clear()
                w, p, ll = evaluate_set(model, tok, sets[name], v, data_dir)
                walls[name, v].append(w); split[name, v] = dict(timer.s); first.setdefault((name, v), (p, ll))
                s = timer.s; fw = s["prefill_s"] + s["decode_s"]
                print(f"repeat {rep} {name:8s} {v}: {w:6.1f} s = prefill {s['prefill_s']:5.1f} s ({s['prefill_calls']} calls, "
                      f"{s['prefill_tok']} tokens, {s['prefill_real']} real) + decode {s['decode_s']:5.1f} s "
                      f"({s['decode_calls']} calls, {s['decode_tok']} tokens) + rest {w - fw:5.1f} s", flush=True)
            if rep == 0:
                (po, _), (pn, _) = first[name, "old"], first[name, "new"]
                print(f"  {name}: {sum(po[k] == pn.get(k) for k in po)}/{len(po)} identical predictions", flush=True)
    print("\nset       old_s   new_s  speed-up  identical  (medians over repeats)")
    tot = collections.Counter()
    for name in a.sets.split(","):
        o, n = statistics.median(walls[name, "old"]), statistics.median(walls[name, "new"]); tot["old"] += o; tot["new"] += n
        (po, llo), (pn, lln) = first[name, "old"], first[name, "new"]
        diff = sorted(k for k in po if po[k] != pn.get(k))
        print(f"{name:8s} {o:7.1f} {n:7.1f} {o / n:8.2f}x  {len(po) - len(diff)}/{len(po)}")
        for k in diff: print(f"    differs {k}: old {po[k]!r} new {pn.get(k)!r}")
        if llo: print(f"    max |Δ log-likelihood| over all choices: {max(abs(x - y) for k in llo for x, y in zip(llo[k], lln[k])):.2e}")
    print(f"{'all':8s} {tot['old']:7.1f} {tot['new']:7.1f} {tot['old'] / tot['new']:8.2f}x")
    print("\nforward split of the last repeat (decoder forwards; 'rest' = output layer, log-softmax, lm-eval):")
    for (name, v), s in split.items():
        fw = s["prefill_s"] + s["decode_s"]; w = walls[name, v][-1]
        print(f"  {name:8s} {v}: wall {w:5.1f} s = prefill {s['prefill_s']:5.1f} s ({s['prefill_calls']} calls, "
              f"{s['prefill_tok']} tokens, {s['prefill_real']} real) + decode {s['decode_s']:5.1f} s ({s['decode_calls']} calls, "
              f"{s['decode_tok']} tokens) + rest {w - fw:5.1f} s")


if __name__ == "__main__":
    main()
