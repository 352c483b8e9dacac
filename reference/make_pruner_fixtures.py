#!/usr/bin/env python3
"""Golden decisions of Optuna's PercentilePruner (MedianPruner at percentile 50) for molt's
pruner (trainer/src/search/pruner.rs): writes tests/fixtures/search/pruner.json.

Each case is a study (minimised or maximised) with COMPLETE trials and, to show they are
ignored, PRUNED, FAIL and other RUNNING trials with intermediate values, plus the running trial
being judged; the case records the pruner's settings, that trial's reports in the order made
(`current`), the complete trials' reports (`completed`, the only ones the pruner reads) and
`pruner.prune(study, trial)`.

1. Hand-written cases: no complete trial, startup trials, warm-up, intervals (with a check
   postponed to the next reported step), steps reported out of order, all-NaN trials, NaN and
   infinite values at the step, n_min_trials, ties with the percentile, percentiles 0 and 100,
   ignored pruned / failed / running trials, and a step reported twice through `Trial.report`.
2. Random cases from a fixed numpy seed over percentile 25/50/75 (sometimes 0 or 100),
   n_startup_trials 0/2/5, n_warmup_steps 0-3, interval_steps 1/3, n_min_trials 1/3, with
   missing steps, NaN and infinite values, and tied values.

Values have at most four decimals, so that a JSON reader that is not correctly rounded still
gets Optuna's floats; NaN and infinities are written as the strings "nan", "inf", "-inf".

    python3 -m venv /tmp/optuna-venv && /tmp/optuna-venv/bin/pip install optuna==4.5.0
    /tmp/optuna-venv/bin/python reference/make_pruner_fixtures.py
"""

import json
import math
import os
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "search", "pruner.json")

DEFAULTS = {"percentile": 50.0, "n_startup_trials": 5, "n_warmup_steps": 0,
            "interval_steps": 1, "n_min_trials": 1}


def enc(v):
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)


def pairs(reports):
    return [[int(s), enc(v)] for s, v in reports]


def make_pruner(settings):
    s = {**DEFAULTS, **settings}
    return optuna.pruners.PercentilePruner(
        s["percentile"], n_startup_trials=s["n_startup_trials"], n_warmup_steps=s["n_warmup_steps"],
        interval_steps=s["interval_steps"], n_min_trials=s["n_min_trials"]), s


def case(name, direction, settings, current, completed, others=()):
    """`current`, each of `completed`: lists of (step, value) in report order (distinct steps);
    `others`: (state, reports) of trials the pruner must ignore."""
    pruner, s = make_pruner(settings)
    study = optuna.create_study(direction=direction, pruner=pruner)
    for reports in completed:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0,
                                     intermediate_values=dict(reports)))
    for state, reports in others:
        kw = {"value": 0.0} if state == TrialState.COMPLETE else {}
        study.add_trial(create_trial(state=state, intermediate_values=dict(reports), **kw))
    study.add_trial(create_trial(state=TrialState.RUNNING, intermediate_values=dict(current)))
    trial = study.get_trials(deepcopy=False)[-1]
    assert trial.state == TrialState.RUNNING and list(trial.intermediate_values.items()) == list(current)
    return record(name, direction, s, current, completed, len(others), pruner.prune(study, trial))


def record(name, direction, s, current, completed, n_ignored, prune):
    return {"name": name, "direction": direction, "pruner": s, "current": pairs(current),
            "completed": [pairs(r) for r in completed], "ignored": n_ignored, "prune": bool(prune)}


def reported_twice():
    """Steps reported twice through the public API: `Trial.report` keeps the first value (and
    warns), both for the complete trial and for the one judged."""
    out = []
    for direction, first, again in (("minimize", 1.0, 9.0), ("minimize", 9.0, 1.0),
                                    ("maximize", 9.0, 1.0), ("maximize", 1.0, 9.0)):
        pruner, s = make_pruner({"n_startup_trials": 1})
        study = optuna.create_study(direction=direction, pruner=pruner)
        done = study.ask()
        done_reports = [(0, 5.0), (1, 5.0), (1, 2.0 if direction == "minimize" else 8.0)]
        for step, v in done_reports:
            done.report(v, step)
        study.tell(done, 0.0)
        t = study.ask()
        reports = [(0, 7.0 if direction == "minimize" else 3.0), (1, first), (1, again)]
        for step, v in reports:
            t.report(v, step)
        prune = pruner.prune(study, study._storage.get_trial(t._trial_id))
        assert prune == t.should_prune()
        out.append(record(f"reported twice: {direction}, {first} then {again}", direction, s,
                          reports, [done_reports], 0, prune))
    return out


def hand_written():
    P, F, R = TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING
    ramp = lambda vals: list(enumerate(vals))  # noqa: E731
    five = [ramp([5, 4, 3, 2]), ramp([6, 5, 4, 3]), ramp([7, 6, 5, 4]), ramp([8, 7, 6, 5]),
            ramp([9, 8, 7, 6])]
    nan, inf = float("nan"), float("inf")
    c = []
    c.append(case("no complete trial", "minimize", {"n_startup_trials": 0}, ramp([100.0]), []))
    c.append(case("no complete trial, only pruned ones", "minimize", {"n_startup_trials": 0},
                  ramp([100.0]), [], [(P, ramp([1.0])), (P, ramp([2.0]))]))
    c.append(case("4 of 5 startup trials", "minimize", {}, ramp([100.0]), five[:4]))
    c.append(case("5 of 5 startup trials", "minimize", {}, ramp([100.0]), five))
    c.append(case("pruned trials are not startup trials", "minimize", {}, ramp([100.0]),
                  five[:4], [(P, ramp([0.0])), (F, ramp([0.0])), (R, ramp([0.0]))]))
    for d in ("minimize", "maximize"):
        for v in (6.9, 7.0, 7.1):  # the median at step 0 is 7
            c.append(case(f"median tie: {d} {v}", d, {}, ramp([v]), five))
    c.append(case("best over all steps, not the last", "minimize", {}, ramp([1.0, 100.0]), five))
    c.append(case("best over all steps, maximize", "maximize", {}, ramp([9.0, 0.0]), five))
    for step in range(4):
        c.append(case(f"warm-up 2 at step {step}", "minimize", {"n_warmup_steps": 2},
                      ramp([100.0] * (step + 1)), five))
    for step in range(9):
        c.append(case(f"interval 3, warm-up 1 at step {step}", "minimize",
                      {"n_warmup_steps": 1, "interval_steps": 3},
                      [(s, 100.0) for s in range(step + 1)],
                      [[(s, 1.0) for s in range(10)]] * 5))
    c.append(case("interval 3: check at 3 postponed to 5", "minimize", {"interval_steps": 3},
                  [(0, 100.0), (2, 100.0), (5, 100.0)], [[(s, 1.0) for s in range(10)]] * 5))
    c.append(case("interval 3: 4 follows a check at 3", "minimize", {"interval_steps": 3},
                  [(0, 100.0), (3, 100.0), (4, 100.0)], [[(s, 1.0) for s in range(10)]] * 5))
    c.append(case("steps out of order: 5 is judged", "minimize", {"n_startup_trials": 1},
                  [(5, 100.0), (3, 100.0)], [[(3, 1.0)]]))
    c.append(case("steps out of order: 5 is judged, 3 missing", "minimize",
                  {"n_startup_trials": 1}, [(5, 100.0), (3, 100.0)], [[(5, 1.0)]]))
    c.append(case("step not reported by complete trials", "minimize", {}, ramp([100.0] * 6), five))
    c.append(case("all NaN is pruned", "minimize", {"n_startup_trials": 1}, ramp([nan, nan]),
                  [ramp([1.0])]))
    c.append(case("all NaN, maximize", "maximize", {"n_startup_trials": 1}, ramp([nan]),
                  [ramp([1.0])]))
    c.append(case("one number among NaN", "minimize", {"n_startup_trials": 1}, ramp([nan, 0.5]),
                  [ramp([1.0, 1.0])]))
    c.append(case("NaN at the step is ignored by the median", "minimize", {"n_startup_trials": 3},
                  ramp([3.0]), [ramp([nan]), ramp([1.0]), ramp([2.0])]))
    c.append(case("only NaN at the step", "minimize", {"n_startup_trials": 2}, ramp([3.0]),
                  [ramp([nan]), ramp([nan])]))
    c.append(case("NaN counts towards n_min_trials", "minimize",
                  {"n_startup_trials": 0, "n_min_trials": 3}, ramp([3.0]),
                  [ramp([nan]), ramp([nan]), ramp([1.0])]))
    c.append(case("n_min_trials 3 with 2 at the step", "minimize",
                  {"n_startup_trials": 0, "n_min_trials": 3}, [(0, 1.0), (1, 9.0)],
                  [ramp([1.0, 1.0]), ramp([1.0, 1.0]), ramp([1.0])]))
    for vals in ([1.0, 2.0, inf], [inf], [-inf, 1.0], [1.0, 2.0, 3.0, inf]):
        for d in ("minimize", "maximize"):
            c.append(case(f"infinities at the step {vals}: {d}", d, {"n_startup_trials": 0},
                          ramp([50.0]), [ramp([v]) for v in vals]))
    c.append(case("infinite trial value", "minimize", {"n_startup_trials": 0}, ramp([inf]),
                  [ramp([1.0])]))
    for p in (0.0, 25.0, 75.0, 100.0):
        for d in ("minimize", "maximize"):
            for v in (5.0, 6.0, 8.0, 9.0):
                c.append(case(f"percentile {p}: {d} {v}", d, {"percentile": p}, ramp([v]), five))
    c.append(case("pruned, failed and running trials are ignored", "minimize",
                  {"n_startup_trials": 1}, ramp([5.0]), [ramp([9.0])],
                  [(P, ramp([1.0])), (P, ramp([1.0])), (F, ramp([1.0])), (R, ramp([1.0]))]))
    c.append(case("ignored trials, maximize", "maximize", {"n_startup_trials": 1}, ramp([5.0]),
                  [ramp([1.0])], [(P, ramp([9.0])), (F, ramp([9.0])), (R, ramp([9.0]))]))
    c.extend(reported_twice())
    return c


def random_cases(n):
    rs = np.random.RandomState(20250)
    P, F, R = TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING
    out = []
    for i in range(n):
        direction = ["minimize", "maximize"][rs.randint(2)]
        pct = [25.0, 50.0, 75.0][rs.randint(3)] if rs.rand() < 0.9 else [0.0, 100.0][rs.randint(2)]
        settings = {"percentile": pct, "n_startup_trials": int(rs.choice([0, 2, 5])),
                    "n_warmup_steps": int(rs.choice([0, 0, 1, 3])),
                    "interval_steps": int(rs.choice([1, 1, 3])),
                    "n_min_trials": int(rs.choice([1, 1, 3]))}
        ties = rs.rand() < 0.4  # small integers: many ties with the percentile
        p_nan = rs.choice([0.0, 0.0, 0.05, 0.2])
        p_inf = 0.03 if rs.rand() < 0.15 else 0.0
        sign = 1.0 if direction == "minimize" else -1.0

        def value(step, quality):
            u = rs.rand()
            if u < p_nan:
                return float("nan")
            if u < p_nan + p_inf:
                return float(rs.choice([np.inf, -np.inf]))
            if ties:
                return float(rs.randint(0, 5))
            # Better with training, noisily; `quality` spreads the trials.
            return round(float(sign * (quality + 2.0 / (1 + step)) + 0.3 * rs.randn()), 4)

        def reports(n_steps, p_skip):
            q = rs.randn()
            return [(s, value(s, q)) for s in range(n_steps) if rs.rand() >= p_skip]

        n_complete = int(rs.choice([0, 1, 2, 3, 4, 5, 6, 8], p=[.04, .08, .12, .16, .16, .16, .14, .14]))
        completed = [reports(int(rs.randint(1, 8)), 0.15) for _ in range(n_complete)]
        others = [([P, F, R][rs.randint(3)], reports(int(rs.randint(1, 6)), 0.2))
                  for _ in range(rs.randint(0, 3))]
        current = reports(int(rs.randint(1, 8)), 0.25)
        if len(current) > 1 and rs.rand() < 0.1:
            current = [current[j] for j in rs.permutation(len(current))]
        if rs.rand() < 0.03:
            current = [(s, float("nan")) for s, _ in current]
        out.append(case(f"random {i}", direction, settings, current, completed, others))
    return out


def main():
    warnings.simplefilter("ignore")  # numpy's all-NaN slices, Trial.report's repeated step
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cases = hand_written() + random_cases(300)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(json.dumps({"generated_by": "reference/make_pruner_fixtures.py",
                            "optuna": optuna.__version__, "numpy": np.__version__,
                            "n_cases": len(cases)})[:-1])
        f.write(', "cases": [\n')
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    n_prune = sum(c["prune"] for c in cases)
    print(f"wrote {OUT}: {len(cases)} cases, {n_prune} pruned")


if __name__ == "__main__":
    main()
