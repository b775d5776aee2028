"""Ray Tune: the Table 2 ablation (``run.py ablate``) and hyper-parameter sweeps (``run.py sweep``).

Each trial is a full TorchTrainer run (:func:`gtms.train.fit.fit`) followed by an evaluation
on every split; trials are resumable because the Tuner and each trial's run folder are.
"""
