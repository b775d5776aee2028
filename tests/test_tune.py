"""Ablation tables and sweeps: spec validation (unit) and real Tune runs (integration)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import run
from gtms.backend import LocalBackend, RayBackend
from gtms.config import ConfigError, load_config
from gtms.errors import UserError
from gtms.tune import ablation, paired
from gtms.tune.plot import plot_ablation, read_curves
from gtms.tune.sweep import load_sweep
from gtms.tune.table import (
    collect,
    compare,
    convergence,
    health,
    markdown,
    run_checks,
    write_tables,
)

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments").glob("*sweep*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_validates(path):
    cfg, spec = load_sweep(path)
    assert spec.space and spec.metric == "val_mean_iou"
    assert load_config(path) == cfg      # other commands ignore the sweep section


def test_sweep_spec_errors(tmp_path):
    base = "extends: " + str(REPO / "experiments" / "synthref.yaml") + "\n"
    cases = {
        "sweep:\n  space:\n    pseudo.sigmaa: {grid: [1]}\n": "unknown key 'pseudo.sigmaa'",
        "sweep:\n  space:\n    sigma: {grid: [1]}\n": "expected section.key",
        "sweep:\n  num_samples: '3'\n  space:\n    pseudo.sigma: {grid: [1]}\n":
            "'sweep.num_samples'",
        "sweep:\n  max_concurrent_trials: 0\n  space:\n    pseudo.sigma: {grid: [1]}\n":
            "integer >= 1",
        "sweep:\n  mode: best\n  space:\n    pseudo.sigma: {grid: [1]}\n": "max or min",
        "sweep:\n  space:\n    pseudo.sigma: {normal: [1, 2]}\n": "must be one of",
        "sweep:\n  space:\n    pseudo.sigma: {uniform: [1]}\n": "[low, high]",
        "sweep:\n  space:\n    loss.mode: {grid: [tree, nope]}\n": "'loss.mode'",
        "sweep:\n  metric: x\n  spaces: {}\n": "unknown key 'sweep.spaces'",
        "sweep:\n  space: {}\n": "empty 'space'",
        "sweep:\n  space:\n    pseudo.sigma: {grid: [1]}\n    pseudo.sigma: {grid: [2]}\n":
            "duplicate key 'pseudo.sigma' at line 5 (first at line 4)",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(base + text)
        with pytest.raises(ConfigError) as info:
            load_sweep(path)
        assert needle in str(info.value), (text, str(info.value))
    # the section comes from the nearest file of the extends chain that has one
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {tmp_path / 's0.yaml'}\nsweep:\n  space:\n"
                     "    optim.lr: {grid: [0.001]}\n")
    assert list(load_sweep(child)[1].space) == ["optim.lr"]
    path = tmp_path / "none.yaml"
    path.write_text(base)
    with pytest.raises(ConfigError, match="no 'sweep:' section"):
        load_sweep(path)


def test_sweep_values_and_bounds_must_be_finite(tmp_path):
    base = "extends: " + str(REPO / "experiments" / "synthref.yaml") + "\n"
    cases = {"optim.lr: {grid: [0.001, .inf]}": "expected a finite number",
             "pseudo.sigma: {choice: [.nan]}": "expected a finite number",
             "optim.lr: {loguniform: [1.0e-4, .inf]}": "bounds must be finite numbers",
             "pseudo.sigma: {uniform: [-.inf, 0.1]}": "bounds must be finite numbers",
             "train.epochs: {randint: [1, .nan]}": "bounds must be finite numbers"}
    for i, (space, needle) in enumerate(cases.items()):
        path = tmp_path / f"f{i}.yaml"
        path.write_text(base + f"sweep:\n  space:\n    {space}\n")
        with pytest.raises(ConfigError, match=needle):
            load_sweep(path)


def test_best_yaml_header_command_is_shell_quoted(tmp_path):
    import shlex

    from gtms.config import Config
    from gtms.tune.sweep import overrides_yaml

    where = tmp_path / "a b $(touch x)" / "best.yaml"
    text = overrides_yaml(Config(), command_path=where, metric="val_mean_iou", value=0.5)
    assert shlex.split(text.splitlines()[0][2:]) == ["python", "run.py", "train", "--config",
                                                    str(where)]


def test_report_of_an_unfinished_ablation(tmp_path):
    """--report: the finished, evaluated trials make the table; the others are left out."""
    from gtms.config import Config, config_to_dict
    from gtms.tune.ablation import report_ablation

    base = config_to_dict(Config())
    for i, (mode, evaluated) in enumerate([("box-lloc", 1), ("box-lloc", 1), ("tree", None)]):
        run_dir = tmp_path / "trials" / f"t{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_mean_iou": 0.2}))
        metrics = {"config": {"base": base, "loss.mode": mode, "train.seed": i},
                   "val_mean_iou": 0.2 + 0.1 * i, "val_overall_iou": 0.1,
                   "testA_mean_iou": 0.3, "testA_overall_iou": 0.3,
                   "testB_mean_iou": 0.3, "testB_overall_iou": 0.3, "run_dir": str(run_dir)}
        if evaluated:
            metrics["evaluated"] = evaluated
        trial = tmp_path / "tuner" / f"run_trial_{i}"
        trial.mkdir(parents=True)
        (trial / "result.json").write_text(json.dumps({"epoch": 1}) + "\n" + json.dumps(metrics))
    result = report_ablation(tmp_path, ["box-lloc", "tree", "mask-bce"])
    assert result["table"]["box-lloc"]["val"]["mean_iou"] == pytest.approx([0.2, 0.3])
    assert result["table"]["tree"]["val"]["mean_iou"] == []
    assert "| box-lloc | 25.00 ± 7.07 |" in result["markdown"]
    assert "finished seeds: box-lloc 2, tree 0, mask-bce 0" in result["markdown"]
    assert (tmp_path / "ablation.png").is_file()
    with pytest.raises(UserError, match="no finished trial"):
        report_ablation(tmp_path / "empty", ["tree"])


def test_table_mean_std_and_files(tmp_path):
    trials = [{"mode": m, "seed": s, "metrics": {"val_mean_iou": v, "val_overall_iou": v / 2}}
              for m, s, v in [("tree", 0, 0.5), ("tree", 1, 0.7), ("box-bce", 0, 0.3)]]
    table = collect(trials, ["box-bce", "tree"], ["val"])
    assert table["tree"]["val"]["mean_iou"] == [0.5, 0.7]
    text = write_tables(tmp_path, table, ["val"], dataset="refcoco", title="t", extra={})
    assert "| tree | 60.00 ± 14.14 | 30.00 ± 7.07 | 61.72 |" in text
    assert "| box-bce | 30.00 | 15.00 | 46.11 |" in text
    assert "| row | val mIoU % | val oIoU % | val paper mIoU % |" in text  # the unit is named
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert len(rows) == 3 and {r["row"] for r in rows} == {"tree", "box-bce"}
    payload = json.loads((tmp_path / "ablation.json").read_text())
    assert payload["rows"]["tree"]["val"]["mean_iou_mean"] == pytest.approx(0.6)
    assert "val paper" not in markdown(table, ["val"], dataset="synthref", title="t")
    # Trials without grounding figures (evaluated before they existed) show a dash.
    assert "| tree | — | — | — | — | — | — | — |" in text


def test_table_grounding_columns(tmp_path):
    trials = [{"mode": "tree", "seed": s, "metrics": {
        "val_mean_iou": 0.4, "val_overall_iou": 0.4, "val_grounded": g,
        "val_mean_iou_grounded": m, "val_err_fp_in_box": f, "val_err_fp_near_box": 0.1,
        "val_err_fp_box_band": 0.05, "val_err_fp_elsewhere": 0.0, "val_err_fn": 0.2}}
        for s, g, m, f in [(0, 0.6, 0.5, 0.1), (1, 0.8, 0.7, 0.3)]]
    table = collect(trials, ["tree"], ["val"])
    text = write_tables(tmp_path, table, ["val"], dataset="synthref", title="t", extra={})
    assert ("| tree | 70.00 ± 14.14 | 60.00 ± 14.14 | 20.00 ± 14.14 | 10.00 ± 0.00 | "
            "5.00 ± 0.00 | 0.00 ± 0.00 | 20.00 ± 0.00 |") in text
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert [float(r["grounded"]) for r in rows] == [0.6, 0.8]
    assert [float(r["err_fp_in_box"]) for r in rows] == [0.1, 0.3]


# --- paired statistics: pinned against scipy and hand computations -------------------------

def test_t_interval_matches_scipy_and_a_hand_computation():
    from scipy import stats

    low, high = np.array([0.40, 0.45, 0.50]), np.array([0.42, 0.50, 0.53])
    mean, lo, hi = paired.t_interval(high - low)
    ci = stats.ttest_rel(high, low).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # by hand: d = 0.02, 0.05, 0.03; sd = 0.0152753; t(0.975, 2) = 4.302653
    assert mean == pytest.approx(0.1 / 3)
    half = 4.302652729911275 * 0.015275252316519465 / np.sqrt(3)
    assert (lo, hi) == pytest.approx((0.1 / 3 - half, 0.1 / 3 + half), abs=1e-9)
    assert lo == pytest.approx(-0.004612, abs=1e-6)                 # 3 seeds: wide
    assert np.isnan(paired.t_interval([0.1])[1]) and paired.t_interval([0.1])[0] == 0.1
    assert paired.t_interval([0.1, float("nan"), 0.3])[0] == pytest.approx(0.2)


def test_pooled_mean_iou_weights_splits_by_sentences():
    metrics = {"val_mean_iou": 0.5, "val_n": 300, "testA_mean_iou": 0.8, "testA_n": 100}
    assert paired.pooled_mean_iou(metrics, ["val", "testA"]) == pytest.approx(0.575)
    assert np.isnan(paired.pooled_mean_iou({"val_mean_iou": 0.5}, ["val"]))   # no count


def _sentences(ious_by_split: dict[str, list[float]], sentences_per_ref: int = 2) -> dict:
    return {split: {"ref_id": np.arange(len(v)) // sentences_per_ref + 1000 * i,
                    "sent_index": np.arange(len(v)) % sentences_per_ref,
                    "iou": np.asarray(v, np.float32)}
            for i, (split, v) in enumerate(ious_by_split.items())}


def _keys(ious, splits=("val",)):
    return paired.sentence_keys(_sentences(dict(zip(splits, ious))), list(splits))


def test_paired_bootstrap_exact_cases():
    rng = np.random.default_rng(1)
    base = [rng.uniform(0.2, 0.8, 40) for _ in range(3)]
    # the same gain on every sentence of every seed: no spread at all
    low = [_keys([b]) for b in base]
    high = [_keys([b + 0.05]) for b in base]
    lo, hi, n = paired.paired_bootstrap(low, high)
    assert (lo, hi) == pytest.approx((0.05, 0.05), abs=1e-6) and n == 40
    lo, hi, _ = paired.paired_bootstrap(low, [_keys([b * 0.9]) for b in base], share=True)
    assert (lo, hi) == pytest.approx((0.9, 0.9), abs=1e-6)
    # a gain that differs by seed only: with 3 seeds the 2.5 % and 97.5 % points are the
    # smallest and largest seed (each drawn three times with probability 1/27 > 2.5 %)
    gains = [0.01, 0.04, 0.10]
    lo, hi, _ = paired.paired_bootstrap(low, [_keys([b + g]) for b, g in zip(base, gains)])
    assert (lo, hi) == pytest.approx((0.01, 0.10), abs=1e-6)
    # sentences only one side scored are left out; refs of different splits stay apart
    two = paired.paired_bootstrap([_keys([base[0][:30], base[1]], ("val", "testA"))],
                                  [_keys([base[0], base[1] + 0.02], ("val", "testA"))])
    assert two[2] == 70


def test_paired_bootstrap_one_seed_matches_the_cluster_standard_error():
    """One seed: only refs are resampled; the interval is the normal one of a ratio-of-sums
    mean difference with the ref as cluster (computed independently here)."""
    rng = np.random.default_rng(2)
    low = rng.uniform(0, 1, 2000)
    high = np.clip(low + rng.normal(0.03, 0.2, 2000), 0, 1)
    lo, hi, _ = paired.paired_bootstrap([_keys([low])], [_keys([high])], resamples=4000)
    d = (high - low).reshape(-1, 2)                      # two sentences per ref
    per_ref, count = d.sum(1), np.full(len(d), 2.0)
    mean = per_ref.sum() / count.sum()
    se = np.sqrt(np.sum((per_ref - mean * count) ** 2)) / count.sum()
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.15 * se)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.08)


def test_verdicts_read_the_interval():
    assert paired.verdict(0.01, 0.05) == "holds"
    assert paired.verdict(-0.01, 0.05) == "undecided"
    assert paired.verdict(-0.05, -0.01) == "fails"
    assert paired.verdict(float("nan"), float("nan")) == "undecided"
    # forest-gradcam <= mask-bce (interval of mask-bce minus forest-gradcam): a tie holds,
    # only forest-gradcam significantly above mask-bce fails
    assert paired.verdict(-0.03, 0.01, at_most=True) == "holds"
    assert paired.verdict(0.01, 0.03, at_most=True) == "holds"
    assert paired.verdict(-0.03, -0.01, at_most=True) == "fails"
    assert paired.verdict(0.91, 0.95, threshold=0.9) == "holds"
    assert paired.verdict(0.85, 0.95, threshold=0.9) == "undecided"


ORDER_SCORES = {"box-bce": [0.30, 0.32, 0.31], "box-lloc": [0.40, 0.45, 0.43],
                "tree": [0.41, 0.44, 0.45], "forest-gradcam": [0.55, 0.57, 0.56],
                "mask-bce": [0.58, 0.61, 0.60]}


def _trials(scores: dict[str, list[float]], splits=("val", "testA"), n=(30, 10),
            sentences: bool = False) -> list[dict]:
    out = []
    for mode, values in scores.items():
        for seed, value in enumerate(values):
            metrics = {}
            for k, (split, count) in enumerate(zip(splits, n)):
                metrics.update({f"{split}_mean_iou": value + 0.01 * k,
                                f"{split}_overall_iou": value, f"{split}_n": count})
            trial = {"mode": mode, "seed": seed, "metrics": metrics}
            if sentences:
                trial["sentences"] = _sentences(
                    {split: np.full(count, value + 0.01 * k)
                     for k, (split, count) in enumerate(zip(splits, n))})
            out.append(trial)
    return out


def test_compare_pairs_rows_by_seed():
    from scipy import stats

    result = compare(_trials(ORDER_SCORES), list(ORDER_SCORES), ["val", "testA"])
    pairs = {(p["lower"], p["higher"]): p for p in result["pairs"]}
    assert list(pairs) == [("box-bce", "box-lloc"), ("box-lloc", "tree"),
                           ("tree", "forest-gradcam"), ("forest-gradcam", "mask-bce"),
                           ("box-lloc", "forest-gradcam")]   # GTMS over L_loc alone, too
    # Per seed, the skip-pair's difference is the two adjacent differences it spans.
    np.testing.assert_allclose(pairs[("box-lloc", "forest-gradcam")]["differences"],
                               np.add(pairs[("box-lloc", "tree")]["differences"],
                                      pairs[("tree", "forest-gradcam")]["differences"]))
    pooled = {m: [v + 0.01 * 10 / 40 for v in vals] for m, vals in ORDER_SCORES.items()}
    assert result["pooled"]["tree"]["mean_iou"] == pytest.approx(pooled["tree"])
    item = pairs[("box-lloc", "tree")]
    ci = stats.ttest_rel(pooled["tree"], pooled["box-lloc"]).confidence_interval()
    assert (item["t_low"], item["t_high"]) == pytest.approx((ci.low, ci.high))
    assert item["differences"] == pytest.approx([0.01, -0.01, 0.02])
    assert item["verdict"] == "undecided" and item["claim"] == "<"
    assert pairs[("box-bce", "box-lloc")]["verdict"] == "holds"
    assert pairs[("forest-gradcam", "mask-bce")]["claim"] == "<="
    assert pairs[("forest-gradcam", "mask-bce")]["verdict"] == "holds"
    assert np.isnan(item["bootstrap_low"])                     # no per-sentence IoUs
    split = item["splits"]["testA"]
    assert split["differences"] == pytest.approx([0.01, -0.01, 0.02])
    share = result["share_of_mask"]
    per_seed = [f / m for f, m in zip(pooled["forest-gradcam"], pooled["mask-bce"])]
    assert share["shares"] == pytest.approx(per_seed)
    ci = stats.ttest_1samp(per_seed, 0.9).confidence_interval()
    assert (share["t_low"], share["t_high"]) == pytest.approx((ci.low, ci.high))
    assert share["verdict"] == "holds"
    # with per-sentence IoUs the bootstrap interval is there too
    boot = compare(_trials(ORDER_SCORES, sentences=True), list(ORDER_SCORES),
                   ["val", "testA"])["pairs"][0]
    assert boot["bootstrap_sentences"] == 40
    assert boot["bootstrap_low"] <= boot["mean"] <= boot["bootstrap_high"]
    # only seeds both rows have are paired; a missing row is skipped
    partial = compare(_trials({"tree": [0.4, 0.5], "forest-gradcam": [0.6]}),
                      ["tree", "forest-gradcam"], ["val", "testA"])
    assert partial["pairs"][0]["seeds"] == [0] and partial["pairs"][0]["verdict"] == "undecided"
    assert partial["share_of_mask"] is None


def test_convergence_over_the_last_fifth_and_health_at_the_last_epoch():
    records = [{"epoch": e, "val_mean_iou": v} for e, v in
               enumerate([0.1, 0.3, 0.4, 0.45, 0.50, 0.50, 0.51, 0.505, 0.509, 0.51], 1)]
    flat = convergence(records)                 # epochs 9 and 10: range 0.001
    assert flat["epochs"] == [9, 10] and flat["converged"] is True
    assert flat["range"] == pytest.approx(0.001)
    rising = convergence(records[:5] + [{"epoch": 6, "val_mean_iou": 0.7}])  # epochs 5, 6
    assert rising["converged"] is False and rising["range"] == pytest.approx(0.2)
    assert convergence(records[:1])["converged"] is None     # one validated epoch: unknown
    assert convergence(records[:4])["epochs"] == [3, 4]      # a fifth of 4 epochs: the last 2
    assert convergence([])["converged"] is None
    last = {"epoch": 3, "train_attention_fallback": 0.2, "val_attention_pointing": 0.7}
    values = health([{"epoch": 2, "train_attention_fallback": 0.9}, last])
    assert values["train_attention_fallback"] == 0.2
    assert np.isnan(values["val_attention_contrast"])
    checks = run_checks([{"mode": "tree", "seed": 0, "records": records},
                         {"mode": "tree", "seed": 1, "records": records[:1]}], ["tree"])
    assert checks["tree"]["converged"] is None                # one seed unknown


def test_report_with_pairs_convergence_and_health(tmp_path):
    trials = _trials(ORDER_SCORES, sentences=True)
    flat = [{"epoch": e, "val_mean_iou": 0.5 + 0.001 * e} for e in range(1, 11)]
    rising = [{"epoch": e, "val_mean_iou": 0.05 * e} for e in range(1, 11)]
    for t in trials:
        t["records"] = rising if t["mode"] == "box-bce" else [dict(r) for r in flat]
        if t["mode"] == "forest-gradcam":
            t["records"][-1].update(train_attention_fallback=0.25, val_attention_fallback=0.5,
                                    val_attention_pointing=0.8,
                                    val_attention_pointing_chance=0.4,
                                    val_attention_contrast=1.5)
    rows = list(ORDER_SCORES)
    table = collect(trials, rows, ["val", "testA"])
    text = write_tables(tmp_path, table, ["val", "testA"], dataset="refcoco", title="t",
                        extra={}, trials=trials)
    assert "The verdict reads the 95 % t interval over seeds" in text
    assert "| box-bce < box-lloc | 3 | +11.67 | [" in text
    assert "| forest-gradcam <= mask-bce | 3 |" in text
    assert "| forest-gradcam >= 90 % of mask-bce | 3 | 93." in text
    assert "mask-bce converged: yes" in text
    assert "| box-bce | no |" in text
    assert "| forest-gradcam | 25.0 | 50.0 | 80.0 | 40.0 | 1.500 |" in text
    assert "| tree | — | — | — | — | — |" in text
    payload = json.loads((tmp_path / "ablation.json").read_text())
    first = payload["comparison"]["pairs"][0]
    assert first["differences"] == pytest.approx([0.1, 0.13, 0.12])
    assert first["verdict"] == "holds" and first["bootstrap_low"] is not None
    assert payload["checks"]["mask-bce"]["converged"] is True
    assert payload["checks"]["tree"]["health"][0]["val_attention_contrast"] is None
    assert payload["ordering"][0].startswith("holds: box-bce < box-lloc")
    paired_rows = list(csv.DictReader((tmp_path / "ablation_paired.csv").open()))
    mean = [r for r in paired_rows if r["comparison"] == "box-bce < box-lloc"
            and r["split"] == "pooled" and r["seed"] == "mean"][0]
    assert float(mean["difference"]) == pytest.approx(np.mean([0.1, 0.13, 0.12]), abs=1e-6)
    assert float(mean["t_low"]) == pytest.approx(first["t_low"], abs=1e-6)
    assert mean["verdict"] == "holds"
    # 5 claims (4 adjacent + box-lloc < forest-gradcam) x 3 seeds x 3 splits + the share's 3
    assert len([r for r in paired_rows if r["seed"] not in ("mean",)]) == 5 * 3 * 3 + 3


def test_read_curves_and_plot(tmp_path):
    trials = []
    for mode, seed, values in [("box-lloc", 0, [0.1, 0.2]), ("tree", 0, [0.2, 0.3]),
                               ("tree", 1, [0.25])]:
        run_dir = tmp_path / f"{mode}-{seed}"
        run_dir.mkdir()
        lines = [{"epoch": 1, "train_loss": 1.0}]  # a train-only record (no validation)
        lines += [{"epoch": e + 2, "val_mean_iou": v, "val_pseudo_label_mean_iou": v + 0.1,
                   "val_weights_mean_iou": v + 0.2} for e, v in enumerate(values)]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        trials.append({"mode": mode, "run_dir": str(run_dir)})
    curves = read_curves(trials)
    assert curves["tree"]["epoch"].tolist() == [2, 3]
    tree = curves["tree"]["val_mean_iou"]
    assert tree.shape == (2, 2) and tree[0].tolist() == [0.2, 0.3] and np.isnan(tree[1, 1])
    assert curves["tree"]["val_weights_mean_iou"][1, 0] == pytest.approx(0.45)
    path = plot_ablation(curves, tmp_path / "ablation.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --- where results go: a local folder or a bucket URI (file:// stands in for s3:// / gs://) --

def test_experiment_paths_keep_uris_and_make_local_folders_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ablation.experiment_dir("s3://my-bucket/runs/x") == "s3://my-bucket/runs/x"
    assert ablation.experiment_dir("runs/x") == str(tmp_path / "runs" / "x")
    assert ablation.tuner_dir("gs://b/x") == "gs://b/x/tuner"
    assert ablation.trials_dir("s3://b/x/") == "s3://b/x/trials"
    assert ablation.trials_dir(str(tmp_path)) == str(tmp_path / "trials")


def test_results_folder_writes_locally_or_uploads_to_a_uri(tmp_path):
    local = tmp_path / "local"
    with ablation.results_folder(str(local)) as folder:
        assert folder == local and folder.is_dir()
    remote = tmp_path / "bucket" / "ablation-refcoco"
    with ablation.results_folder(f"file://{remote}") as folder:
        assert folder != remote
        (folder / "ablation.md").write_text("# table\n")
    assert (remote / "ablation.md").read_text() == "# table\n"
    failed = tmp_path / "bucket" / "failed"
    with pytest.raises(RuntimeError), ablation.results_folder(f"file://{failed}") as folder:
        (folder / "ablation.md").write_text("half\n")
        raise RuntimeError("plot failed")
    assert not failed.exists()  # nothing half-written is uploaded


def test_trials_with_runs_copies_metrics_of_runs_in_a_bucket(tmp_path):
    run_dir = tmp_path / "bucket" / "trials" / "trial-a"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_mean_iou": 0.4}) + "\n")
    trials = [{"mode": "tree", "metrics": {"run_dir": f"file://{run_dir}"}},
              {"mode": "box-lloc", "metrics": {"run_dir": str(run_dir)}}]
    runs = ablation.trials_with_runs(trials, tmp_path / "copies")
    assert runs[1] == {"mode": "box-lloc", "run_dir": str(run_dir)}
    assert Path(runs[0]["run_dir"]).parent == tmp_path / "copies"
    assert read_curves(runs)["tree"]["val_mean_iou"].tolist() == [[0.4]]


@pytest.mark.parametrize("command,config,folder", [
    ("ablate", "ablation_refcoco_rn50.yaml", "ablation-refcoco"),
    ("sweep", "sweep_sigma.yaml", "sweep-sweep_sigma")])
def test_default_out_follows_a_bucket_run_dir(command, config, folder, monkeypatch):
    """On a cluster train.run_dir is a bucket URI; ablate/sweep results go below it."""
    import gtms.tune.sweep

    seen = {}

    def fake(*args, out_dir, **kwargs):
        seen["out"] = out_dir
        raise ablation.TuneError("stop here")

    monkeypatch.setattr(ablation, "run_ablation", fake)
    monkeypatch.setattr(gtms.tune.sweep, "run_sweep", fake)
    code = run.main([command, "--config", str(REPO / "experiments" / config),
                     "--set", "train.run_dir=s3://my-bucket/runs"])
    assert code == 2 and seen["out"] == f"s3://my-bucket/runs/{folder}"


TINY = ["--set", "data.synthref_images=24", "--set", "data.synthref_seed=5",
        "--set", "data.input_size=64", "--set", "data.limit_train_refs=16", "--set",
        "data.limit_eval_refs=4", "--set", "train.epochs=1", "--set", "train.batch_size=8",
        "--set", "data.eval_splits=val,testA", "--set", "ray.num_workers=1",
        "--set", "pretrain.before_train=false"]


@pytest.mark.integration
def test_ablation_of_two_rows_writes_matching_tables(synthref_small, tmp_path, ray_cluster,
                                                    capsys, monkeypatch):
    out = tmp_path / "ablation"
    # W&B offline: the Ray workers (started before this test) get the mode from the driver
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run.main(["ablate", "--config", str(REPO / "experiments" / "synthref_ablation.yaml"),
                     "--rows", "box-lloc,tree", "--out", str(out), "--set",
                     f"data.root={synthref_small}", *TINY,
                     "--set", "train.trackers=[tensorboard,mlflow,wandb]"]) == 0
    check_tracked_ablation(out, rows=("box-lloc", "tree"), wandb=True)
    payload = json.loads((out / "ablation.json").read_text())
    assert set(payload["rows"]) == {"box-lloc", "tree"} and payload["splits"] == ["val", "testA"]
    text = (out / "ablation.md").read_text()
    assert "| box-lloc |" in text and "| tree |" in text
    # The numbers in the table are the trials' own evaluation results.
    for trial in payload["trials"]:
        evaluated = json.loads(Path(trial["run_dir"], "summary.json").read_text())
        assert evaluated["best_checkpoint"] == trial["best_checkpoint"]
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert len(rows) == 4
    for row in rows:
        cell = payload["rows"][row["row"]][row["split"]]
        assert float(row["mean_iou"]) == pytest.approx(cell["mean_iou"][0], abs=1e-6)
    # --report rebuilds the same table from the Tuner's files, training nothing
    before = payload["rows"]
    (out / "ablation.json").unlink()
    assert run.main(["ablate", "--report", "--rows", "box-lloc,tree", "--out", str(out)]) == 0
    assert json.loads((out / "ablation.json").read_text())["rows"] == before
    # An existing experiment is never overwritten: it must be resumed explicitly.
    assert run.main(["ablate", "--rows", "tree", "--out", str(out), "--set",
                     f"data.root={synthref_small}", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


def check_tracked_ablation(out: Path, rows: tuple[str, ...], *, wandb: bool = False) -> None:
    """MLflow (``<out>/mlflow.db``): a parent run holding the report and plot, and one run per
    trial below it, tagged with its row and seed, holding its epochs. W&B: the trials' offline
    runs in the parent's group."""
    from test_tracking import mlflow_artifacts, mlflow_history, mlflow_runs, of_kind, wandb_records

    uri = f"sqlite:///{out / 'mlflow.db'}"
    runs = mlflow_runs(uri)
    parent = runs[runs["tags.gtms.kind"] == "ablation"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    parent_id = parent.iloc[0]["run_id"]
    assert {"ablation.md", "ablation.csv", "ablation.json", "ablation.png"} <= mlflow_artifacts(
        uri, parent_id)
    trials = runs[runs["tags.gtms.kind"] == "trial"]
    assert sorted(trials["tags.row"]) == sorted(rows)
    assert set(trials["tags.seed"]) == {"0"}
    assert set(trials["tags.mlflow.parentRunId"]) == {parent_id}
    assert set(trials["status"]) == {"FINISHED"}
    payload = json.loads((out / "ablation.json").read_text())
    for trial in payload["trials"]:
        run_id = json.loads(Path(trial["run_dir"], "tracking.json").read_text())["mlflow"]
        line = json.loads(Path(trial["run_dir"], "metrics.jsonl").read_text().splitlines()[-1])
        assert mlflow_history(uri, run_id, "val_mean_iou") == [(line["step"],
                                                                line["val_mean_iou"])]
        if wandb:
            started = of_kind(wandb_records(Path(trial["run_dir"])), "run")[0]
            assert started.run_group == f"ablation {out.name}"
            assert f"row={trial['mode']}" in started.tags
    if wandb:
        assert of_kind(wandb_records(out), "artifact")   # the parent's report files


@pytest.mark.integration
def test_two_point_sweep_writes_loadable_best_yaml(synthref_small, tmp_path, ray_cluster,
                                                  capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"extends: {REPO / 'experiments' / 'synthref.yaml'}\n"
                     "sweep:\n  space:\n    pseudo.sigma: {grid: [0.01, 0.1]}\n")
    out = tmp_path / "sweep-out"
    capsys.readouterr()
    assert run.main(["sweep", "--config", str(sweep), "--out", str(out), "--set",
                     f"data.root={synthref_small}", *TINY,
                     "--set", "train.trackers=[tensorboard,mlflow]"]) == 0
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.strip()]
    # what train shows, tagged per trial, one line per finished trial and the table: no
    # Tune status tables, no config dicts
    assert len(lines) <= 60, "\n".join(lines)
    assert max(map(len, lines)) <= 400
    assert not any("Current best trial" in line or "Trial status" in line for line in lines)
    for sigma in ("0.01", "0.1"):
        assert sum(line.startswith(f"trial pseudo.sigma={sigma} finished") for line in lines) == 1
        assert any(line.startswith(f"[pseudo.sigma={sigma}] epoch 1/1") for line in lines)
    best = load_config(out / "best.yaml")
    assert best.pseudo.sigma in (0.01, 0.1) and best.data.input_size == 64
    assert best.train.tracking_uri == ""   # as given: not the sweep's own store
    from test_tracking import mlflow_artifacts, mlflow_runs

    runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    parent = runs[runs["tags.gtms.kind"] == "sweep"].iloc[0]
    assert "best.yaml" in mlflow_artifacts(f"sqlite:///{out / 'mlflow.db'}", parent["run_id"])
    trials = runs[runs["tags.gtms.kind"] == "trial"]
    assert sorted(trials["tags.pseudo.sigma"]) == ["0.01", "0.1"]
    assert set(trials["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert (out / "best.yaml").read_text().startswith("# python run.py train --config")


def test_threads_per_trial_share_the_cores():
    from gtms.tune.local import threads_per_trial

    assert threads_per_trial(1, cores=8) == 8
    assert threads_per_trial(3, cores=8) == 2
    assert threads_per_trial(2, cores=2) == 1
    assert threads_per_trial(5, cores=2) == 1        # never below one thread


def test_reusable_eval_needs_every_split_at_the_same_settings(tmp_path):
    from gtms.config import load_config
    from gtms.tune.trial import reusable_eval

    cfg = load_config(REPO / "experiments" / "synthref.yaml", ["data.input_size=224"])
    assert reusable_eval(str(tmp_path), cfg, ["val"]) is None        # no eval.json
    report = {"threshold": cfg.train.threshold, "input_size": 224,
              "splits": {"val": {"mean_iou": 0.4}, "testA": {"mean_iou": 0.5}}}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    assert reusable_eval(str(tmp_path), cfg, ["val", "testA"]) == report
    assert reusable_eval(str(tmp_path), cfg, ["val", "testB"]) is None
    other = load_config(REPO / "experiments" / "synthref.yaml", ["data.input_size=160"])
    assert reusable_eval(str(tmp_path), other, ["val"]) is None
    other = load_config(REPO / "experiments" / "synthref.yaml",
                        ["data.input_size=224", "train.threshold=0.5"])
    assert reusable_eval(str(tmp_path), other, ["val"]) is None


def test_report_of_a_local_ablation(tmp_path):
    """--report on an ablation run with --no-ray reads the trials' trial.json files."""
    from gtms.config import Config, config_to_dict
    from gtms.tune.ablation import report_ablation

    base = config_to_dict(Config())
    for mode, seed, score in [("tree", 0, 0.3), ("tree", 1, 0.5), ("box-bce", 0, 0.1)]:
        run_dir = tmp_path / "trials" / f"{mode}-s{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_mean_iou": score}))
        metrics = {f"{s}_{k}": score for s in ("val", "testA", "testB")
                   for k in ("mean_iou", "overall_iou")}
        (run_dir / "trial.json").write_text(json.dumps(
            {"mode": mode, "seed": seed, "base": base,
             "metrics": {**metrics, "run_dir": str(run_dir), "evaluated": 1}}))
    (tmp_path / "trials" / "box-lloc-s0").mkdir()          # unfinished: no trial.json
    result = report_ablation(tmp_path, ["box-bce", "box-lloc", "tree"])
    assert result["table"]["tree"]["val"]["mean_iou"] == pytest.approx([0.3, 0.5])
    assert result["table"]["box-lloc"]["val"]["mean_iou"] == []
    assert "| tree | 40.00 ± 14.14 |" in result["markdown"]
    assert "finished seeds: box-bce 1, tree 2, box-lloc 0" in result["markdown"]
    # older trials: no sentence counts, per-sentence IoUs or health keys, one epoch
    assert "| box-bce <= tree |" not in result["markdown"]
    assert "| box-bce < tree | 0 | — | — | — | undecided |" in result["markdown"]
    assert "| tree | — | s0 —, s1 — |" in result["markdown"]
    assert "| tree | — | — | — | — | — |" in result["markdown"]
    assert (tmp_path / "ablation_paired.csv").is_file()


def test_local_ablation_checks_its_folder_before_anything_runs(tmp_path):
    from gtms.config import load_config

    cfg = load_config(REPO / "experiments" / "synthref_ablation.yaml",
                      [f"data.root={tmp_path / 'never-made'}"])
    common = {"rows": ["tree"], "seeds": 1, "max_concurrent": 1, "backend": LocalBackend()}
    (tmp_path / "old" / "trials").mkdir(parents=True)
    with pytest.raises(UserError, match="pass --resume"):
        ablation.run_ablation(cfg, out_dir=tmp_path / "old", resume=False, **common)
    with pytest.raises(UserError, match="nothing to continue"):
        ablation.run_ablation(cfg, out_dir=tmp_path / "new", resume=True, **common)
    with pytest.raises(UserError, match="local --out"):
        ablation.run_ablation(cfg, out_dir="s3://bucket/abl", resume=False, **common)
    with pytest.raises(UserError, match="max-concurrent"):
        ablation.run_ablation(cfg, out_dir=tmp_path / "new", resume=False,
                              **{**common, "max_concurrent": 0})
    assert not (tmp_path / "never-made").exists()


def test_a_failing_local_trial_is_reported_with_its_log(tmp_path, capsys):
    """A child that stops with an error is named with its exit code and log; the driver goes
    on and returns it as failed, with no trial.json."""
    from gtms.config import load_config
    from gtms.tune.local import run_local_trials

    cfg = load_config(None, ["data.dataset=refcoco", f"data.root={tmp_path / 'missing'}"])
    trials, failed = run_local_trials(cfg, rows=["box-bce"], seed_values=[0],
                                      splits=["val"], trials_dir=tmp_path / "trials",
                                      max_concurrent=1, poll_s=0.2)
    assert trials == [] and len(failed) == 1
    assert failed[0].startswith("box-bce-s0 (exit 2") and "box-bce-s0.log" in failed[0]
    log = (tmp_path / "trials" / "box-bce-s0.log").read_text()
    assert "error:" in log and "missing" in log
    assert "FAILED box-bce-s0" in capsys.readouterr().err


@pytest.mark.integration
def test_ablation_without_ray_trains_processes_and_matches_ray_eval(synthref_small, tmp_path,
                                                                   ray_cluster, capsys):
    """--no-ray: one trial as a child process; its evaluation (no Ray) scores the best
    checkpoint exactly as Ray Data's actors do, and --resume after a lost trial.json only
    rebuilds it from the kept run and eval.json."""
    from gtms.eval.evaluate import evaluate

    out = tmp_path / "ablation"
    assert run.main(["ablate", "--no-ray", "--rows", "box-lloc", "--out", str(out), "--set",
                     f"data.root={synthref_small}", *TINY,
                     "--set", "train.trackers=[tensorboard,mlflow]"]) == 0
    check_tracked_ablation(out, rows=("box-lloc",))
    trial = json.loads((out / "trials" / "box-lloc-s0" / "trial.json").read_text())
    best = trial["metrics"]["best_checkpoint"]
    assert (Path(best) / "eval.json").is_file()
    on_ray = evaluate(best, None, ["val", "testA"], backend=RayBackend())["splits"]
    sentences = ablation.read_trial_sentences(trial["metrics"])   # for the paired bootstrap
    for split in ("val", "testA"):
        assert len(sentences[split]["iou"]) == trial["metrics"][f"{split}_n"]
        assert float(sentences[split]["iou"].mean()) == pytest.approx(
            trial["metrics"][f"{split}_mean_iou"], abs=1e-6)
        assert np.array_equal(np.sort(sentences[split]["ref_id"]),
                              np.sort(on_ray[split]["sentences"]["ref_id"]))
        assert trial["metrics"][f"{split}_n"] == on_ray[split]["n"]
        assert trial["metrics"][f"{split}_mean_iou"] == pytest.approx(on_ray[split]["mean_iou"],
                                                                    abs=1e-9)
        assert trial["metrics"][f"{split}_overall_iou"] == pytest.approx(
            on_ray[split]["overall_iou"], abs=1e-9)
    table = json.loads((out / "ablation.json").read_text())["rows"]
    assert table["box-lloc"]["val"]["mean_iou"] == [trial["metrics"]["val_mean_iou"]]
    (out / "trials" / "box-lloc-s0" / "trial.json").unlink()
    capsys.readouterr()
    assert run.main(["ablate", "--no-ray", "--resume", "--rows", "box-lloc", "--out", str(out),
                     "--set", f"data.root={synthref_small}", *TINY,
                     "--set", "train.trackers=[tensorboard,mlflow]"]) == 0
    check_tracked_ablation(out, rows=("box-lloc",))   # the same runs, not new ones
    assert "trained before" in (out / "trials" / "box-lloc-s0.log").read_text()
    assert json.loads((out / "ablation.json").read_text())["rows"] == table


# --- rows paired by seed: one seed, one initial model and one data order for every row ------

def test_rows_of_a_seed_start_from_the_same_weights():
    import torch

    from gtms.config import Config, replace
    from gtms.train.loop import initial_model

    def weights(mode, seed):
        cfg = replace(Config(), model={"preset": "tiny"}, data={"word_len": 8},
                      loss={"mode": mode}, train={"seed": seed})
        return initial_model(cfg).state_dict()

    first = weights("mask-bce", 3)
    for mode in ("box-bce", "tree", "forest-gradcam"):
        other = weights(mode, 3)
        assert other.keys() == first.keys()
        assert all(torch.equal(first[k], other[k]) for k in first), mode
    assert not all(torch.equal(first[k], v) for k, v in weights("mask-bce", 4).items())


def _train_order(root, mode, seed, *, keep, epochs, limit=0, start=0):
    """Ref ids per epoch of LocalFeed's training batches for ``mode``."""
    from gtms.data.feeds import LocalFeed
    from gtms.data.pipeline import spec_for

    specs = {role: spec_for(role, input_size=64, word_len=8, mode=mode, seed=seed)
             for role in ("train", "val")}
    ctx = LocalFeed(root=str(root), train_split="train", val_split="val",
                    train_spec=specs["train"], val_spec=specs["val"], limit_train=limit,
                    in_memory_train=keep)
    order = []
    for epoch in range(start, epochs):
        ctx.set_epoch(epoch)
        order.append([int(r) for b in ctx.train_batches(epoch, 8) for r in b["ref_id"]])
    return order


def test_rows_of_a_seed_see_the_same_data_order(synthref_small):
    """The samples a mode needs (trees, forests, masks) change their size and so whether the
    split is kept in memory; neither changes the refs' order per epoch (nor a resume does)."""
    streamed = _train_order(synthref_small, "tree", 7, keep=False, epochs=3)
    assert len(set(map(tuple, streamed))) == 3                   # reshuffled every epoch
    assert sorted(streamed[0]) == sorted(streamed[2])
    for mode, keep in [("mask-bce", True), ("box-bce", False), ("forest-gradcam", True)]:
        assert _train_order(synthref_small, mode, 7, keep=keep, epochs=3) == streamed, mode
    assert _train_order(synthref_small, "tree", 7, keep=True, epochs=3, start=2) == \
        streamed[2:]                                             # a resumed run
    assert _train_order(synthref_small, "tree", 8, keep=False, epochs=1)[0] != streamed[0]
    # data.limit_train_refs: the same first refs every epoch, kept or streamed
    limited = _train_order(synthref_small, "mask-bce", 7, keep=True, epochs=3, limit=13)
    assert limited == _train_order(synthref_small, "box-lloc", 7, keep=False, epochs=3,
                                   limit=13)
    assert all(len(e) == 13 and set(e) == set(limited[0]) for e in limited)


def test_row_positions_limit_then_shuffle():
    from gtms.data.reading import row_positions

    assert row_positions([2, 3]) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert row_positions([2, 3], limit=3) == [(0, 0), (0, 1), (1, 0)]
    shuffled = row_positions([2, 3, 4], limit=6, shuffle_seed=1)
    assert sorted(shuffled) == row_positions([2, 3, 4], limit=6)
    assert shuffled == row_positions([2, 3, 4], limit=6, shuffle_seed=1)
    groups = [g for g, _ in shuffled]                            # whole row groups in turn
    assert groups == sorted(groups, key=groups.index)


def test_per_sentence_ious_travel_beside_eval_json_and_into_the_trial(tmp_path):
    """eval.json leaves the per-sentence IoUs out; they go to eval.sentences.npz, which a
    reused evaluation reads back and the trial's run folder keeps for the report."""
    from gtms.config import load_config
    from gtms.eval.evaluate import (
        SENTENCES,
        read_sentence_ious,
        sentence_ious_bytes,
        sentences_path,
        without_sentences,
    )
    from gtms.tune.ablation import read_trial_sentences
    from gtms.tune.trial import reusable_eval, save_sentence_ious, trial_metrics

    arrays = {"ref_id": np.array([5, 5, 9]), "sent_index": np.array([0, 1, 0], np.int32),
              "iou": np.array([0.5, 0.25, 1.0], np.float32)}
    results = {"val": {"mean_iou": 0.58, "overall_iou": 0.5, "n": 3, SENTENCES: arrays}}
    back = read_sentence_ious(sentence_ious_bytes(results))
    assert set(back) == {"val"} and all(np.array_equal(back["val"][k], v)
                                        for k, v in arrays.items())
    assert sentence_ious_bytes(without_sentences(results)) is None
    assert sentences_path("/a/b/eval.json") == "/a/b/eval.sentences.npz"
    cfg = load_config(REPO / "experiments" / "synthref.yaml", ["data.input_size=224"])
    report = {"threshold": cfg.train.threshold, "input_size": 224,
              "splits": without_sentences(results)}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    (tmp_path / "eval.sentences.npz").write_bytes(sentence_ious_bytes(results))
    reused = reusable_eval(str(tmp_path), cfg, ["val"])
    assert np.array_equal(reused["splits"]["val"][SENTENCES]["iou"], arrays["iou"])
    path = save_sentence_ious(reused, str(tmp_path / "run"))
    metrics = trial_metrics({"final": {}, "run_dir": str(tmp_path / "run"),
                             "best_checkpoint": str(tmp_path)}, reused, sentence_ious=path)
    assert "val_sentences" not in metrics and metrics["sentence_ious"] == path
    assert len(json.dumps(metrics)) < 1000                 # no arrays in the Tune result
    assert np.array_equal(read_trial_sentences(metrics)["val"]["ref_id"], arrays["ref_id"])
    assert read_trial_sentences({}) is None


def test_trial_tags_name_the_row_and_seed_or_the_swept_values():
    from gtms.tune.tuner import swept, trial_tag

    assert trial_tag({"loss.mode": "tree", "train.seed": 2}) == "tree s2"
    assert trial_tag(swept({"base": {}, "storage": "x", "pseudo.sigma": 0.0123456,
                            "loss.gamma_schedule": "cosine"})) == \
        "loss.gamma_schedule=cosine, pseudo.sigma=0.01235"
