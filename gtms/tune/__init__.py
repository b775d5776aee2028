"""Ray Tune: the Table 2 ablation (``run.py ablate``) and hyper-parameter sweeps (``run.py sweep``).

Each trial (:func:`gtms.tune.trial.run_trial`) trains a config on a backend
(:func:`gtms.train.fit.fit`) and evaluates it on every split; Ray Tune schedules the trials, or
for ``ablate --no-ray`` a pool of child processes (:mod:`gtms.tune.local`). Trials are
resumable because the Tuner and each trial's run folder are.
"""
