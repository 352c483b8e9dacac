#!/usr/bin/env python3
"""Golden values of Optuna's TPESampler for molt's sampler (trainer/src/search/tpe.rs):
writes tests/fixtures/search/tpe.json.

1. `parzen`: for each kind of domain (float, log float, stepped float, int, stepped int, log
   int, categorical) and several sets of distinct observations (up to 30, so the weights'
   ramp past 25 is exercised), Optuna's `_ParzenEstimator` (the
   sampler's default parameters) evaluated by `log_pdf` at fixed points.
2. `split`: a study with complete, pruned (with and without intermediate values), running
   and failed trials, minimised and maximised: which trials Optuna's `_split_trials` puts
   below (with n_below = gamma of the finished trials), and the acquisition
   log l(x) - log g(x) of each parameter at fixed candidate points.

Random draws are not compared (numpy's generator is not molt's); densities, splits and
acquisition values are deterministic.

    python3 -m venv /tmp/optuna-venv && /tmp/optuna-venv/bin/pip install optuna==4.5.0
    /tmp/optuna-venv/bin/python reference/make_tpe_fixtures.py
"""

import json
import os

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator
from optuna.samplers._tpe.sampler import _split_trials, default_gamma
from optuna.trial import TrialState, create_trial

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "search", "tpe.json")


def domain(d):
    if isinstance(d, CategoricalDistribution):
        return {"type": "categorical", "n": len(d.choices)}
    kind = "int" if isinstance(d, IntDistribution) else "float"
    return {"type": kind, "low": d.low, "high": d.high, "log": d.log, "step": d.step}


def points(d, n=41):
    if isinstance(d, CategoricalDistribution):
        return [float(i) for i in range(len(d.choices))]
    if isinstance(d, IntDistribution):
        return [float(v) for v in range(d.low, d.high + 1, d.step)]
    if d.step is not None:
        k = int(round((d.high - d.low) / d.step))
        return [d.low + i * d.step for i in range(k + 1)]
    if d.log:
        return list(np.exp(np.linspace(np.log(d.low), np.log(d.high), n)))
    return list(np.linspace(d.low, d.high, n))


def centre(d, x):
    """x's offset from the prior kernel's centre, in the estimator's (log) space."""
    half = (d.step or 0) / 2
    t = np.log if d.log else (lambda v: v)
    return t(x) - 0.5 * (t(d.low - half) + t(d.high + half))


def main():
    # The univariate TPE of the optuna the authors ran (spec §7.4); optuna 5 defaults to
    # multivariate, so it is asked for explicitly.
    params = optuna.samplers.TPESampler(multivariate=False)._parzen_estimator_parameters
    domains = {
        "float": FloatDistribution(-2.0, 3.0),
        "log_float": FloatDistribution(1e-5, 1.0, log=True),
        "step_float": FloatDistribution(0.0, 1.0, step=0.125),
        "int": IntDistribution(1, 17),
        "step_int": IntDistribution(4, 64, step=4),
        "log_int": IntDistribution(1, 128, log=True),
        "categorical": CategoricalDistribution(["a", "b", "c", "d", "e"]),
    }
    rng = np.random.RandomState(0)
    parzen = []
    for name, d in domains.items():
        grid = points(d)
        for n_obs in (0, 1, 3, 12, 30):
            if isinstance(d, CategoricalDistribution):
                obs = [float(rng.randint(len(d.choices))) for _ in range(n_obs)]
            else:
                # Distinct values: with tied observations Optuna's kernel order follows numpy's
                # unstable argsort, which no other sort reproduces (weights differ past 25).
                # For the same reason no observation sits at the prior kernel's centre.
                pool = [x for x in grid if not np.isclose(centre(d, x), 0.0, atol=1e-12)]
                n_obs = min(n_obs, len(pool))
                obs = [float(x) for x in rng.choice(pool, size=n_obs, replace=False)]
            pe = _ParzenEstimator({name: np.asarray(obs)}, {name: d}, params)
            logp = pe.log_pdf({name: np.asarray(grid, dtype=float)})
            parzen.append({"name": f"{name}/{n_obs}", "domain": domain(d), "observations": obs,
                           "points": [float(x) for x in grid], "log_pdf": [float(v) for v in logp]})

    split = []
    space = {"x": FloatDistribution(-5.0, 5.0), "r": IntDistribution(2, 32, step=2),
             "kind": CategoricalDistribution(["p", "q", "s"]), "lr": FloatDistribution(1e-4, 1.0, log=True)}
    for direction in ("minimize", "maximize"):
        study = optuna.create_study(direction=direction)
        trials = []
        rs = np.random.RandomState(1 if direction == "minimize" else 2)
        for i in range(26):
            p = {"x": float(rs.uniform(-5, 5)), "r": int(rs.choice(range(2, 33, 2))),
                 "kind": ["p", "q", "s"][rs.randint(3)], "lr": float(np.exp(rs.uniform(np.log(1e-4), 0)))}
            dists = dict(space)
            if i % 5 == 3:  # conditional: some trials lack `lr`
                del p["lr"], dists["lr"]
            value = (p["x"] - 1) ** 2 + (p["r"] - 12) ** 2 / 50 + (0 if p["kind"] == "q" else 1)
            if i % 7 == 5:
                state, kw = TrialState.PRUNED, {"intermediate_values": {1: value + 1, 2 + i % 3: value}}
            elif i == 20:
                state, kw = TrialState.PRUNED, {}
            elif i % 9 == 4:
                state, kw = TrialState.RUNNING, {}
            elif i == 13:
                state, kw = TrialState.FAIL, {}
            else:
                state, kw = TrialState.COMPLETE, {"value": value}
            t = create_trial(params=p, distributions=dists, state=state, **kw)
            study.add_trial(t)
        frozen = study.get_trials(deepcopy=False)
        usable = [t for t in frozen if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
        n = sum(t.state != TrialState.RUNNING for t in usable)
        below, above = _split_trials(study, usable, default_gamma(n), False)
        sampler = optuna.samplers.TPESampler(multivariate=False)
        acq = {}
        for pname, d in space.items():
            mpe_b = sampler._build_parzen_estimator(study, {pname: d}, below, handle_below=True)
            mpe_a = sampler._build_parzen_estimator(study, {pname: d}, above, handle_below=False)
            cand = points(d, 17)
            lb = mpe_b.log_pdf({pname: np.asarray(cand, dtype=float)})
            la = mpe_a.log_pdf({pname: np.asarray(cand, dtype=float)})
            acq[pname] = {"domain": domain(d), "points": [float(c) for c in cand],
                          "acquisition": [float(v) for v in lb - la]}
        records = []
        for t in frozen:
            rec = {"number": t.number, "state": t.state.name.lower(),
                   "params": {k: float(d.to_internal_repr(t.params[k])) for k, d in t.distributions.items()}}
            if t.state == TrialState.COMPLETE:
                rec["value"] = t.value
            if t.state == TrialState.PRUNED and t.intermediate_values:
                step, v = max(t.intermediate_values.items())
                rec["step"], rec["value"] = step, v
            records.append(rec)
        split.append({"direction": direction, "trials": records,
                      "below": [t.number for t in below], "acquisition": acq})

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"generated_by": "reference/make_tpe_fixtures.py", "optuna": optuna.__version__,
                   "numpy": np.__version__, "parzen": parzen, "split": split}, f, indent=1)
    print(f"wrote {OUT}: {len(parzen)} estimators, {len(split)} studies")


if __name__ == "__main__":
    main()
