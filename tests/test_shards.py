"""Parquet shards: round trip, manifest, resume/idempotence, ensure_synthref and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtms.backend import LocalBackend
from gtms.commands import prepare as prepare_command
from gtms.data.records import RecordWithImage, RefRecord, SkipLog
from gtms.data.refer import load_refer
from gtms.data.shards import (
    MANIFEST_NAME,
    SHARD_COLUMNS,
    SHARD_SCHEMA,
    ShardError,
    read_manifest,
    read_shard_records,
    records_to_table,
    split_files,
    verify_shards,
    write_shards,
)
from gtms.data.synthref import SynthRefSettings, ensure_synthref, prepare_synthref, refer_source
from gtms.data.transforms import rle_encode
from gtms.errors import UserError
from gtms.model.checkpoint import Trained

SETTINGS = SynthRefSettings(num_images=24, seed=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthref")
    prepare_synthref(out, SETTINGS, rows_per_file=20, rows_per_row_group=8, progress=False)
    return out


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare_command.register(parser.add_subparsers())
    args = parser.parse_args(["prepare", *argv])
    return args.func(args)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_hold_exactly_the_loaded_records_and_original_bytes(prepared):
    source = refer_source(prepared)
    records = load_refer(source, SkipLog(strict=True))
    rows = list(read_shard_records(prepared / "shards"))
    assert len(rows) == len(records)
    assert {r.record.ref_id: r.record for r in rows} == {r.ref_id: r for r in records}
    for record, image in rows[:10]:
        assert image == source.image_path(record.file_name).read_bytes()


def test_manifest_describes_the_files(prepared):
    shard_dir = prepared / "shards"
    manifest = read_manifest(shard_dir)
    assert manifest["complete"] and manifest["dataset"] == "synthref"
    assert manifest["generator"] == SETTINGS.to_dict()
    assert list(manifest["columns"]) == list(SHARD_COLUMNS)
    assert manifest["skipped"] == {}
    refs = load_refer(refer_source(prepared), SkipLog(strict=True))
    for split in ("train", "val", "testA", "testB"):
        in_split = [r for r in refs if r.split == split]
        assert manifest["counts"][split] == len(in_split)
        assert manifest["sentences"][split] == sum(len(r.sentences) for r in in_split)
        files = split_files(shard_dir, split)
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == len(in_split)
    train = split_files(shard_dir, "train")
    assert len(train) >= 3  # several files for a big split
    for entry in manifest["shards"]:
        file = shard_dir / entry["path"]
        assert sha(file) == entry["sha256"] and file.stat().st_size == entry["bytes"]
        meta = pq.ParquetFile(file).metadata
        assert meta.num_row_groups == entry["num_row_groups"]
        assert all(meta.row_group(i).num_rows <= 8 for i in range(meta.num_row_groups))
        assert pq.read_schema(file).remove_metadata() == SHARD_SCHEMA
    # sources are recorded relative to the manifest, so the folder can move
    assert (shard_dir / manifest["source"]["refs"]).resolve() == refer_source(prepared).refs_path
    assert not (shard_dir / ".tmp").exists()


def test_split_folder_reads_as_one_parquet_dataset(prepared):
    table = pq.read_table(prepared / "shards" / "val")
    assert table.num_rows == read_manifest(prepared / "shards")["counts"]["val"]
    boxes = np.array(table.column("box_xywh").to_pylist())
    assert boxes.shape == (table.num_rows, 4) and (boxes[:, 2:] > 0).all()


def test_rerun_is_idempotent(prepared):
    shard_dir = prepared / "shards"
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in shard_dir.rglob("*.parquet")}
    manifest_bytes = (shard_dir / MANIFEST_NAME).read_bytes()
    report = prepare_synthref(prepared, SETTINGS, rows_per_file=20, rows_per_row_group=8,
                              progress=False)
    assert report.written == 0 and report.reused == len(before)
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in shard_dir.rglob("*.parquet")} == before
    assert (shard_dir / MANIFEST_NAME).read_bytes() == manifest_bytes


def test_interrupted_run_resumes(tmp_path):
    out = tmp_path / "ds"
    first = prepare_synthref(out, SETTINGS, rows_per_file=20, rows_per_row_group=8,
                             progress=False)
    shard_dir = out / "shards"
    final_manifest = (shard_dir / MANIFEST_NAME).read_bytes()
    entries = first.manifest["shards"]
    # simulate a crash: manifest not complete, one file never renamed into place, one damaged,
    # a temporary file left behind
    (shard_dir / entries[-1]["path"]).unlink()
    (shard_dir / entries[0]["path"]).write_bytes(b"half a file")
    (shard_dir / ".tmp").mkdir()
    (shard_dir / ".tmp" / "train-part-00009.parquet.123").write_bytes(b"partial")
    manifest = json.loads(final_manifest)
    manifest["complete"] = False
    (shard_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    again = prepare_synthref(out, SETTINGS, rows_per_file=20, rows_per_row_group=8,
                             progress=False)
    assert again.written == 2 and again.reused == len(entries) - 2
    assert (shard_dir / MANIFEST_NAME).read_bytes() == final_manifest
    assert not (shard_dir / ".tmp").exists()
    # a new layout rewrites what changed (splits that had several files) and leaves no stale
    # file behind
    third = prepare_synthref(out, SETTINGS, rows_per_file=1000, rows_per_row_group=8,
                             progress=False)
    several = {e["split"] for e in entries if e["path"].endswith("part-00001.parquet")}
    assert third.written == len(several) >= 1 and third.written + third.reused == 4
    assert sorted(p.relative_to(shard_dir).as_posix() for p in shard_dir.rglob("*.parquet")) == \
        sorted(e["path"] for e in third.manifest["shards"])


def test_ensure_synthref_generates_once(tmp_path):
    out = tmp_path / "auto"
    shard_dir = ensure_synthref(out, num_images=8, seed=2, difficulty="easy")
    assert shard_dir == (out / "shards").resolve()
    stamp = (shard_dir / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_synthref(out, num_images=8, seed=2, difficulty="easy") == shard_dir
    assert (shard_dir / MANIFEST_NAME).stat().st_mtime_ns == stamp
    ensure_synthref(out, num_images=10, seed=2, difficulty="easy")
    manifest = read_manifest(shard_dir)
    assert manifest["generator"]["num_images"] == 10 and manifest["complete"]
    assert len(list((out / "images").glob("*.jpg"))) == 10


def test_cli_prepares_synthref(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num-images", "8", "--seed", "1", "--difficulty", "hard"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out / "shards")
    assert manifest["generator"]["difficulty"] == "hard"
    for split, count in manifest["counts"].items():
        assert f"{split}: {count} refs" in printed
    assert "skipped: none" in printed
    assert cli(argv) == 0
    assert "0 shard file(s) written" in capsys.readouterr().out
    assert cli(["--out", str(out), "--split-by", "umd"]) == 2
    assert "--split-by" in capsys.readouterr().err


def test_run_py_prepare(tmp_path, capsys):
    import run

    assert run.main(["prepare", "--out", str(tmp_path / "r"), "--num-images", "6"]) == 0
    assert "manifest:" in capsys.readouterr().out
    assert read_manifest(tmp_path / "r" / "shards")["complete"]


def test_cli_prepares_a_refcoco_layout(prepared, tmp_path, capsys):
    root = tmp_path / "refer" / "refcocog"
    root.mkdir(parents=True)
    src = refer_source(prepared)
    (root / "refs(umd).p").write_bytes(src.refs_path.read_bytes())
    (root / "instances.json").write_bytes(src.instances_path.read_bytes())
    out = tmp_path / "g"
    assert cli(["--dataset", "refcocog", "--refer-root", str(root.parent), "--images",
                str(src.images_dir), "--out", str(out)]) == 0
    manifest = read_manifest(out / "shards")
    assert manifest["dataset"] == "refcocog" and manifest["split_by"] == "umd"
    assert manifest["generator"] is None
    assert manifest["source"]["images"] == str(src.images_dir.resolve())
    assert manifest["counts"] == read_manifest(prepared / "shards")["counts"]


texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@st.composite
def records(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mask = np.array(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))).reshape(h, w)
    box = tuple(draw(st.lists(st.floats(0, 1e4, width=32), min_size=4, max_size=4)))
    record = RefRecord(
        ref_id=draw(st.integers(0, 2**62)), ann_id=draw(st.integers(0, 2**62)),
        image_id=draw(st.integers(0, 2**62)), file_name=draw(texts), height=h, width=w,
        box_xywh=box, category_id=draw(st.integers(0, 2**31 - 1)), category=draw(texts),
        split=draw(st.sampled_from(["train", "val", "testA", "testB", "test"])),
        sentences=tuple(draw(st.lists(texts, min_size=1, max_size=4))),
        mask_rle_counts=rle_encode(mask))
    return RecordWithImage(record, draw(st.binary(max_size=64)))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(records(), min_size=1, max_size=6))
def test_record_table_record_round_trip(tmp_path, rows):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(records_to_table(rows), path, row_group_size=4)
    back = list(read_shard_records(path))
    assert back == rows
    assert [r.record.decode_mask().shape for r in back] == [(r.record.height, r.record.width)
                                                           for r in rows]


def test_write_shards_from_records_needs_no_generator(prepared, tmp_path):
    source = refer_source(prepared)
    records = load_refer(source, SkipLog(strict=True))[:7]
    report = write_shards(records, source=source, shard_dir=tmp_path / "s", skips=SkipLog(
        strict=True), rows_per_file=3, rows_per_row_group=2, progress=False)
    assert sum(report.manifest["counts"].values()) == 7
    assert [r.record for r in read_shard_records(tmp_path / "s")] == sorted(
        records, key=lambda r: (["train", "val", "testA", "testB"].index(r.split), 0))


@pytest.mark.integration
def test_ray_data_reads_the_shards(prepared, ray_cluster):
    ds = ray_cluster.data.read_parquet(str(prepared / "shards" / "train"))
    batch = ds.take_batch(5, batch_format="numpy")
    assert set(batch) == set(SHARD_COLUMNS)
    assert np.stack(batch["box_xywh"]).shape == (5, 4)
    assert isinstance(batch["image"][0], bytes)


# ------------------------------------------------------------------ shards checked before a run


@pytest.fixture()
def copied(prepared, tmp_path) -> Path:
    """A copy of the prepared dataset that a test may damage."""
    shutil.copytree(prepared, tmp_path / "ds")
    return tmp_path / "ds"


def first_file(root: Path, split: str) -> Path:
    manifest = read_manifest(root / "shards")
    return root / "shards" / next(e["path"] for e in manifest["shards"] if e["split"] == split)


def repair(message: str) -> None:
    """Run the prepare command a ShardError names (through run.py)."""
    import run

    command = message.split("with: ")[-1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "run.py", "prepare"]
    assert run.main(argv[2:]) == 0


def test_verify_accepts_what_prepare_wrote(prepared):
    manifest = verify_shards(prepared, ["train", "val", "testA", "testB"])
    assert manifest == read_manifest(prepared / "shards")


@pytest.mark.parametrize("damage", ["truncated", "missing", "same_size_bytes_changed"])
def test_damaged_shard_is_named_with_the_command_that_repairs_it(copied, damage, capsys):
    file = first_file(copied, "val")
    original = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(original[: len(original) // 2])
    elif damage == "missing":
        file.unlink()
    else:  # one image byte flipped: size and footer stay right, only the checksum sees it
        middle = len(original) // 2
        file.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1:])
        verify_shards(copied, ["val"], checksums=False)
    verify_shards(copied, ["train"])  # other splits are not looked at
    with pytest.raises(ShardError) as info:
        verify_shards(copied, ["train", "val"])
    message = str(info.value)
    assert isinstance(info.value, UserError) and message.startswith(f"{file}: ")
    assert f"python run.py prepare --out {copied} --num-images 24 --seed 5" in message
    assert "--rows-per-file 20 --rows-per-row-group 8" in message
    repair(message)
    capsys.readouterr()
    assert file.read_bytes() == original
    verify_shards(copied, ["train", "val"])


def test_interrupted_prepare_is_refused(copied):
    manifest = read_manifest(copied / "shards")
    manifest["complete"] = False
    (copied / "shards" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="prepare did not finish") as info:
        verify_shards(copied, ["train"])
    assert str(copied / "shards" / MANIFEST_NAME) in str(info.value)
    repair(str(info.value))
    assert verify_shards(copied, ["train"])["complete"]


def test_unknown_split_unreadable_manifest_and_stray_file(copied):
    with pytest.raises(ShardError, match="no shards for split test; the prepared splits are "
                                         "train, val, testA, testB"):
        verify_shards(copied, ["train", "test"])
    stray = copied / "shards" / "val" / "part-00099.parquet"
    shutil.copy(first_file(copied, "val"), stray)
    with pytest.raises(ShardError, match="not written by prepare") as info:
        verify_shards(copied, ["val"])
    assert str(info.value).startswith(f"{stray}: ")
    stray.unlink()
    (copied / "shards" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="no readable shard manifest"):
        verify_shards(copied, ["val"])


def test_refcoco_repair_command_names_the_sources(prepared, tmp_path):
    root = tmp_path / "refer" / "refcoco"
    root.mkdir(parents=True)
    src = refer_source(prepared)
    (root / "refs(unc).p").write_bytes(src.refs_path.read_bytes())
    (root / "instances.json").write_bytes(src.instances_path.read_bytes())
    out = tmp_path / "my data"
    assert cli(["--dataset", "refcoco", "--refer-root", str(root.parent), "--images",
                str(src.images_dir), "--out", str(out)]) == 0
    file = first_file(out, "testB")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ShardError, match="not a readable Parquet file|bytes, the manifest") as \
            info:
        verify_shards(out, ["testB"])
    assert shlex.quote(str(out)) in str(info.value)
    repair(str(info.value))
    verify_shards(out, ["testB"])


def test_refer_folder_through_a_symlink_is_recorded_as_given(prepared, tmp_path):
    """The manifest keeps the paths the user typed (absolute, links not resolved): the refs
    file may itself be a link to a file of another name elsewhere."""
    src = refer_source(prepared)
    store = tmp_path / "store"
    (store / "real_refer" / "refcoco").mkdir(parents=True)
    (store / "refs_unc_v2.pkl").write_bytes(src.refs_path.read_bytes())
    (store / "real_refer" / "refcoco" / "refs(unc).p").symlink_to(store / "refs_unc_v2.pkl")
    (store / "real_refer" / "refcoco" / "instances.json").write_bytes(
        src.instances_path.read_bytes())
    (tmp_path / "refer").symlink_to(store / "real_refer")
    (tmp_path / "images").symlink_to(src.images_dir)
    out = tmp_path / "ds"
    assert cli(["--dataset", "refcoco", "--refer-root", str(tmp_path / "refer"), "--images",
                str(tmp_path / "images"), "--out", str(out)]) == 0
    source = read_manifest(out / "shards")["source"]
    assert source["refs"] == str(tmp_path / "refer" / "refcoco" / "refs(unc).p")
    assert source["images"] == str(tmp_path / "images")
    file = first_file(out, "val")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ShardError) as info:
        verify_shards(out, ["val"])
    argv = shlex.split(str(info.value).split("with: ")[-1])
    assert argv[argv.index("--refer-root") + 1] == str(tmp_path / "refer")
    assert argv[argv.index("--images") + 1] == str(tmp_path / "images")
    repair(str(info.value))
    verify_shards(out, ["val"])
    # train and eval check the shards under data.root as given (a link is not resolved)
    from gtms.config import load_config
    from gtms.data.roots import prepare_data_root

    (tmp_path / "ds_link").symlink_to(out)
    cfg = load_config(None, ["data.dataset=refcoco", f"data.root={tmp_path / 'ds_link'}"])
    assert prepare_data_root(cfg) == str(tmp_path / "ds_link")


def test_printed_prepare_commands_quote_every_word(tmp_path):
    """The repair command and the "run: python run.py prepare" hint quote each word, so a
    name holding ``$(...)``, ``;`` or spaces is passed on as written."""
    from gtms.config import load_config
    from gtms.data.roots import DataRootError, prepare_data_root
    from gtms.data.shards import repair_command

    manifest = {"dataset": "refcoco;touch x", "split_by": "unc $(touch y)",
                "rows_per_file": "7;id", "rows_per_row_group": 64,
                "source": {"refs": "/r e/$(touch z)/refcoco/refs(unc).p", "images": "/im g"}}
    root = str(tmp_path / "out $(touch w)")
    assert shlex.split(repair_command(manifest, root)) == [
        "python", "run.py", "prepare", "--dataset", "refcoco;touch x", "--split-by",
        "unc $(touch y)", "--refer-root", "/r e/$(touch z)", "--images", "/im g", "--out", root,
        "--rows-per-file", "7;id"]
    synth = {"dataset": "synthref", "generator": {"num_images": 5, "seed": 1,
                                                  "difficulty": "easy"}}
    assert shlex.split(repair_command(synth, root))[3:5] == ["--out", root]
    cfg = load_config(None, ["data.dataset=refcoco", f"data.root={root}"])
    with pytest.raises(DataRootError) as info:
        prepare_data_root(cfg)
    command = str(info.value).split("run: ")[-1]
    assert shlex.split(command) == ["python", "run.py", "prepare", "--dataset", "refcoco",
                                    "--refer-root", "DIR", "--images", "DIR", "--out", root]


def test_train_and_eval_check_the_shards_before_starting(copied, tmp_path, monkeypatch,
                                                         capsys):
    import torch

    import run
    from gtms.config import load_config
    from gtms.eval import evaluate as evaluate_module
    from gtms.train.fit import fit

    file = first_file(copied, "train")
    file.write_bytes(file.read_bytes()[:-1000])
    cfg = load_config(None, [f"data.root={copied}", "data.synthref_images=24",
                             "data.synthref_seed=5", f"train.run_dir={tmp_path / 'runs'}"])
    with pytest.raises(ShardError, match="truncated") as info:
        fit(cfg, LocalBackend())
    assert str(file) in str(info.value)
    assert not (tmp_path / "runs").exists()
    # eval (its model is a stand-in: the shards are checked before the model is used)
    monkeypatch.setattr(evaluate_module, "load_trained",
                        lambda checkpoint, given: Trained(torch.nn.Identity(), cfg, Path("x")))
    with pytest.raises(ShardError, match="truncated"):
        evaluate_module.evaluate("ckpt", None, ["val", "train"], None, backend=LocalBackend())
    # the CLI: exit 2, one line naming the file and the repair
    capsys.readouterr()
    assert run.main(["train", "--no-ray", "--config", "none", "--set", f"data.root={copied}",
                     "--set", "data.synthref_images=24", "--set", "data.synthref_seed=5",
                     "--set", f"train.run_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {file}: ") and err.count("\n") == 1
    assert "python run.py prepare --out" in err
