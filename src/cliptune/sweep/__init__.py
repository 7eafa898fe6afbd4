"""`cliptune sweep`: trials of training runs over a search space of config keys, as an Optuna study.

space (parse and check the space file, grid points, a trial's overrides; pure) -> trial (one training
run and what it measured) -> study (the Optuna study: sampler, storage, budgets, resume) -> table
(trials.csv / trials.json) and report (+ plots, pareto: report.md / .html).
"""
