#!/usr/bin/env python3
"""The hybrid search, measured (BENCHMARKS.md, "Hybrid PEFT search"):

1. sampler quality on a synthetic objective: mean best value after N trials over seeds, for
   molt's TPE and random search (`molt bench search --json`) and Optuna 4.5's TPESampler on
   the same objective (defined identically below);
2. scaling: wall time of a 2 × 16-trial search on the built-in `demo` model through
   `molt serve --workers N` for N = 1, 2, 4 (max_parallel 4 in every run);
3. sampler quality on the demo model's task: step-1 searches (16 trials over six methods'
   on/off switches, validation loss) with molt's TPE, random search, and Optuna's TPE
   driving the same service job by job.

Needs the molt binary and a Python with optuna==4.5.0 for the Optuna columns
(python3 -m venv /tmp/optuna-venv && /tmp/optuna-venv/bin/pip install optuna==4.5.0).

    python3 bench/search.py [--molt target/debug/molt] [--optuna-python /tmp/optuna-venv/bin/python]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

OPTUNA_SYNTHETIC = r"""
import json, math, sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
W = [-0.5, 0.3, -0.4, 0.2, 0.6, -0.3]
def objective(t):
    lr = t.suggest_float("lr", 1e-5, 1e-1, log=True)
    r = t.suggest_int("r", 4, 64, step=4)
    depth = t.suggest_int("depth", 1, 64, log=True)
    act = t.suggest_categorical("act", [0, 1, 2])
    use_x = t.suggest_categorical("use_x", [0, 1])
    v = (math.log10(lr) + 3) ** 2 + ((r - 24) / 16) ** 2 + (math.log2(depth) - 3) ** 2 / 4
    v += [0.6, 0.0, 1.2][act]
    v += (t.suggest_float("x", -3, 3) - 1) ** 2 / 2 if use_x == 1 else 0.8
    for i, w in enumerate(W):
        v += w * t.suggest_categorical(f"b{i}", [0, 1])
    return v
seeds, trials = int(sys.argv[1]), int(sys.argv[2])
for seed in range(seeds):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    best, curve = math.inf, []
    for _ in range(trials):
        t = study.ask()
        v = objective(t)
        study.tell(t, v)
        best = min(best, v)
        curve.append(best)
    print(json.dumps({"sampler": "optuna-tpe", "seed": seed, "best_after": curve}))
"""

OPTUNA_SERVICE = r"""
import json, math, sys, time, urllib.request
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, key, train, valid, seed, trials = sys.argv[1:7]
hyper = json.loads(sys.argv[7])
candidates = json.loads(sys.argv[8])
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())
study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=int(seed)))
best, curve = math.inf, []
for _ in range(int(trials)):
    t = study.ask()
    on = [m for m in candidates if t.suggest_categorical(m, [False, True])]
    if not on:
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
        curve.append(best)
        continue
    methods = [candidates[m] for m in on]
    method = methods[0] if len(methods) == 1 else {"type": "hybrid", "methods": methods}
    job = call("POST", "/v1/fine_tuning/jobs", {"model": "demo", "training_file": train,
               "validation_file": valid, "method": method, "hyperparameters": hyper, "seed": int(seed)})
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.3)
        job = call("GET", "/v1/fine_tuning/jobs/" + job["id"])
    points = [m for m in call("GET", "/v1/fine_tuning/jobs/%s/metrics?limit=1000" % job["id"])["data"]
              if m.get("valid_loss") is not None]
    if job["status"] != "succeeded" or not points:
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        curve.append(best)
        continue
    v = points[-1]["valid_loss"]
    study.tell(t, v)
    best = min(best, v)
    curve.append(best)
print(json.dumps({"sampler": "optuna-tpe", "seed": int(seed), "best_after": curve}))
"""

# Step 1's fixed configurations of the six candidates the demo-task comparison switches
# (the values of trainer::search::hybrid's catalogue, spec §7.2).
DEMO_CANDIDATES = {
    "lora_in_proj": {"type": "lora", "targets": ["in_proj"], "r": 8, "s": 0.1, "weight_decay": 1e-4},
    "lora_out_proj": {"type": "lora", "targets": ["out_proj"], "r": 8, "s": 0.1, "weight_decay": 1e-4},
    "A": {"type": "partial", "target": "A_log"},
    "D": {"type": "partial", "target": "D"},
    "prompt": {"type": "prompt", "n": 1, "kind": "prefix", "projection": True, "weight_decay": 1e-4},
    "lora_p_X": {"type": "lora_p", "slice": "X", "r": 8, "s": 0.1, "weight_decay": 1e-4},
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dataset(path, n, offset):
    topics = ["river", "stone", "forest", "desert", "winter", "harbour", "market", "garden"]
    with open(path, "w") as f:
        for i in range(n):
            a, b = topics[(i + offset) % 8], topics[(3 * i + offset) % 8]
            f.write(json.dumps({"prompt": f"Where does the mamba {i} rest? ",
                                "completion": f"By the {a}, then the {b}."}) + "\n")


class Server:
    def __init__(self, molt, workers, work):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = os.path.join(work, f"data-{self.port}")
        env = dict(os.environ, MOLT_ADMIN_TOKEN="bench")
        for k in ("MOLT_DATABASE_URL", "MOLT_STORE", "MOLT_MODELS_DIR", "MOLT_DATA_DIR"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            [molt, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", data,
             "--workers", str(workers), "--rate-limit-requests", "0", "--poll-interval-ms", "100"],
            env=env, stdout=open(os.path.join(work, f"serve-{self.port}.log"), "w"),
            stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        self.key = open(os.path.join(data, "first-key")).read().strip()

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def upload(self, path):
        out = subprocess.run(
            ["curl", "-sf", self.url + "/v1/files", "-H", f"Authorization: Bearer {self.key}",
             "-F", "purpose=fine-tune", "-F", f"file=@{path}"],
            check=True, capture_output=True, text=True)
        return json.loads(out.stdout)["id"]

    def search(self, body):
        s = self.call("POST", "/v1/fine_tuning/searches", body)
        while s["status"] in ("queued", "running"):
            time.sleep(0.3)
            s = self.call("GET", f"/v1/fine_tuning/searches/{s['id']}")
        return s

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def mean_at(curves, n):
    return sum(c[n - 1] for c in curves) / len(curves)


def table(rows, points):
    out = ["| sampler | " + " | ".join(f"best after {p}" for p in points) + " |",
           "|---|" + "---|" * len(points)]
    for name, curves in rows.items():
        out.append(f"| {name} ({len(curves)} seeds) | "
                   + " | ".join(f"{mean_at(curves, p):.4f}" for p in points) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molt", default=os.path.join(REPO, "target", "debug", "molt"))
    ap.add_argument("--optuna-python", default="/tmp/optuna-venv/bin/python")
    ap.add_argument("--seeds", type=int, default=10, help="synthetic objective")
    ap.add_argument("--demo-seeds", type=int, default=3, help="demo task")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: synthetic,scaling,demo")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    have_optuna = os.path.exists(args.optuna_python)
    work = tempfile.mkdtemp(prefix="molt-search-bench-")
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    print(f"machine: {cpu}, {os.cpu_count()} cores")

    if "synthetic" not in skip:
        out = subprocess.run([args.molt, "bench", "search", "--json", "--seeds", str(args.seeds),
                              "--trials", "60"], check=True, capture_output=True, text=True).stdout
        if have_optuna:
            out += subprocess.run([args.optuna_python, "-c", OPTUNA_SYNTHETIC, str(args.seeds), "60"],
                                  check=True, capture_output=True, text=True).stdout
        rows = {}
        for line in out.splitlines():
            r = json.loads(line)
            rows.setdefault(r["sampler"], []).append(r["best_after"])
        print("\n## synthetic objective (minimum -1.2)\n")
        print(table(rows, [10, 20, 30, 40, 60]))

    train = os.path.join(work, "train.jsonl")
    valid = os.path.join(work, "valid.jsonl")
    dataset(train, 32, 0)
    dataset(valid, 8, 5)
    hyper = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 32}

    if "scaling" not in skip:
        print("\n## 2 x 16-trial search on demo, max_parallel 4\n")
        print("| workers | wall s | trials/min | speed-up | efficiency |")
        print("|---|---|---|---|---|")
        base = None
        for workers in (1, 2, 4):
            srv = Server(args.molt, workers, work)
            try:
                t_id, v_id = srv.upload(train), srv.upload(valid)
                t0 = time.monotonic()
                s = srv.search({"model": "demo", "training_file": t_id, "validation_file": v_id,
                                "methods": list(DEMO_CANDIDATES), "trials": {"step1": 16, "step2": 16},
                                "max_parallel": 4, "hyperparameters": hyper, "seed": 1})
                wall = time.monotonic() - t0
                assert s["status"] == "succeeded", s
                base = base or wall
                print(f"| {workers} | {wall:.1f} | {32 / wall * 60:.1f} | {base / wall:.2f}x "
                      f"| {base / wall / workers:.0%} |")
            finally:
                srv.stop()

    if "demo" not in skip:
        srv = Server(args.molt, 2, work)
        try:
            t_id, v_id = srv.upload(train), srv.upload(valid)
            rows = {}
            for seed in range(args.demo_seeds):
                for sampler in ("tpe", "random"):
                    s = srv.search({"model": "demo", "training_file": t_id, "validation_file": v_id,
                                    "methods": list(DEMO_CANDIDATES), "trials": {"step1": 16, "step2": 0},
                                    "max_parallel": 1, "hyperparameters": hyper, "seed": seed,
                                    "sampler": sampler})
                    assert s["status"] == "succeeded", s
                    trials = srv.call("GET", f"/v1/fine_tuning/searches/{s['id']}/trials")["data"]
                    best, curve = float("inf"), []
                    for t in trials:
                        if t["status"] == "complete":
                            best = min(best, t["value"])
                        curve.append(best)
                    rows.setdefault(f"molt-{sampler}", []).append(curve)
                if have_optuna:
                    out = subprocess.run(
                        [args.optuna_python, "-c", OPTUNA_SERVICE, srv.url, srv.key, t_id, v_id, str(seed),
                         "16", json.dumps(hyper), json.dumps(DEMO_CANDIDATES)],
                        check=True, capture_output=True, text=True).stdout
                    rows.setdefault("optuna-tpe", []).append(json.loads(out)["best_after"])
            print("\n## demo task: step 1 over six methods, validation loss (lower is better)\n")
            print(table(rows, [4, 8, 12, 16]))
        finally:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
