"""Config resolution: merge order, extends, --set conversion, errors, round trip, shipped YAMLs."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

import run
from gtms.config import (
    SECTIONS,
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    read_yaml_file,
    replace,
)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_papers_settings():
    cfg = Config()
    assert cfg.data.input_size == 416
    assert cfg.pseudo.sigma == 0.02
    assert cfg.loss.gamma_warmup_epochs == 10
    assert cfg.optim.optimizer == "adam" and cfg.optim.lr == 1e-5
    assert cfg.optim.lr_decay == 0.1
    assert cfg.train.epochs == 50
    assert cfg.loss.mode == "forest-gradcam"


def test_merge_order_defaults_extends_file_set(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochs: 7\n  batch_size: 4\npseudo:\n  sigma: 0.5\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(child, ["pseudo.sigma=0.1"])
    assert cfg.train.epochs == 9          # file beats the file it extends
    assert cfg.train.batch_size == 4      # inherited from base
    assert cfg.pseudo.sigma == 0.1        # --set beats everything
    assert cfg.data.input_size == 416     # untouched default


def test_extends_chain_of_three_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  preset: tiny\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\ntrain:\n  epochs: 3\n")
    c = write(tmp_path / "c.yaml", "extends: b.yaml\n")
    cfg = load_config(c)
    assert cfg.model.preset == "tiny" and cfg.train.epochs == 3
    write(tmp_path / "x.yaml", "extends: y.yaml\n")
    write(tmp_path / "y.yaml", "extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("train.epochs=3", "train", "epochs", 3),
        ("pseudo.sigma=5e-2", "pseudo", "sigma", 0.05),
        ("optim.lr=1", "optim", "lr", 1.0),               # int accepted for a float
        ("data.strict=true", "data", "strict", True),
        ("optim.milestones=[3,6]", "optim", "milestones", (3, 6)),
        ("optim.milestones=4,8", "optim", "milestones", (4, 8)),
        ("data.eval_splits=val,testA", "data", "eval_splits", ("val", "testA")),
        ("model.clip_weights=/w/RN50.pt", "model", "clip_weights", "/w/RN50.pt"),
        ("model.clip_weights=null", "model", "clip_weights", None),
        ("ray.use_gpu=false", "ray", "use_gpu", False),
        ("train.name=123", "train", "name", "123"),       # a str key keeps digits as text
        ("loss.mode=tree", "loss", "mode", "tree"),
    ],
)
def test_set_converts_types(override, section, key, expected):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, section), key) == expected


@pytest.mark.parametrize(
    "text, needles",
    [
        ("trian:\n  epochs: 3\n", ["unknown section 'trian'", "allowed sections", "train"]),
        ("train:\n  epoch: 3\n", ["unknown key 'train.epoch'", "epochs", "batch_size"]),
        ("train:\n  epochs: three\n", ["'train.epochs'", "an integer"]),
        ("train:\n  epochs: 2.5\n", ["'train.epochs'", "an integer"]),
        ("data:\n  strict: 1\n", ["'data.strict'", "true/false"]),
        ("loss:\n  mode: boxes\n", ["'loss.mode'", "'box-bce'", "'forest-gradcam'"]),
        ("pseudo:\n  sigma: -1\n", ["'pseudo.sigma'", "must be > 0"]),
        ("data:\n  input_size: 100\n", ["'data.input_size'", "multiple of 32"]),
        ("train: 3\n", ["section 'train'", "mapping"]),
        ("- a\n- b\n", ["mapping of sections"]),
    ],
)
def test_file_errors_name_key_file_and_allowed(tmp_path, text, needles):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for needle in needles:
        assert needle in message
    if "section" not in needles[0] and "mapping of" not in needles[0]:
        assert str(path) in message


def test_set_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["epochs=3"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr' in --set"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="'train.threshold' in --set"):
        load_config(None, ["train.threshold=1.5"])


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "train: [1,\n"))


def test_non_utf8_file_is_a_config_error_naming_it(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# caf\u00e9 settings\ntrain:\n  epochs: 3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert str(path) in str(info.value) and "0xe9 at line 1" in str(info.value)
    assert run.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and str(path) in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(("text", "key", "line", "first"), [
    ("train:\n  epochs: 3\n  epochs: 4\n", "epochs", 3, 2),
    ("train:\n  epochs: 3\nmodel:\n  preset: tiny\ntrain:\n  batch_size: 2\n", "train", 5, 1),
    ("optim: {lr: 0.1, lr: 0.2}\n", "lr", 1, 1),
])
def test_duplicate_keys_are_refused_naming_key_and_file(tmp_path, text, key, line, first):
    path = write(tmp_path / "dup.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"duplicate key {key!r} at line {line} (first at line {first})" in message
    assert str(path) in message


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = write(tmp_path / "merge.yaml", "base: &b {epochs: 3, batch_size: 2}\n"
                 "train:\n  <<: *b\n  epochs: 5\n".replace("base: &b", "x-base: &b"))
    with pytest.raises(ConfigError, match="unknown section 'x-base'"):
        load_config(path)   # merges are read (then the unknown section is refused as usual)
    from gtms.config import read_yaml_file

    assert read_yaml_file(path)["train"] == {"epochs": 5, "batch_size": 2}


def test_run_folder_config_is_read_with_the_same_rules(tmp_path):
    from gtms.train.run_folder import load_run_config

    path = write(tmp_path / "config.yaml", "train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_run_config(str(path))
    path.write_bytes(b"train:\n  name: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_run_config(str(path))


def alias_bomb(levels: int = 10) -> str:
    """A 0.5 KB "billion laughs": each list holds the one before nine times (9**10 strings)."""
    items = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ",\n    ".join(items) + "]"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    import time

    bomb = alias_bomb()
    assert len(bomb) < 600
    path = write(tmp_path / "bomb.yaml", f"data:\n  eval_splits: {bomb}\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="aliases expand to more than 100,000 values") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert run.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}: ") and err.count("\n") == 1
    assert "lol" not in err and len(err) < 300   # nothing expanded is shown
    # the same reader serves extends chains, sweep files and a run's config.yaml
    child = write(tmp_path / "child.yaml", "extends: bomb.yaml\n")
    with pytest.raises(ConfigError, match=f"{path}: its aliases expand"):
        load_config(child)
    from gtms.config import sweep_section
    from gtms.train.run_folder import load_run_config

    with pytest.raises(ConfigError, match="aliases expand"):
        sweep_section(write(tmp_path / "sweep.yaml", f"sweep:\n  space: {bomb}\n"))
    with pytest.raises(ConfigError, match="aliases expand"):
        load_run_config(str(path))
    # and --set values
    with pytest.raises(ConfigError, match="bad value for 'data.eval_splits' in --set"):
        load_config(None, [f"data.eval_splits={bomb}"])
    assert time.monotonic() - start < 10


def test_yaml_aliases_of_normal_size_and_self_reference(tmp_path):
    path = write(tmp_path / "ok.yaml", "x: &s [val, testA]\ndata:\n  eval_splits: *s\n")
    assert read_yaml_file(path)["data"]["eval_splits"] == ["val", "testA"]
    path = write(tmp_path / "self.yaml", "data:\n  eval_splits: &a [val, *a]\n")
    with pytest.raises(ConfigError, match="alias refers to the value that contains it"):
        load_config(path)


def test_bad_value_messages_show_a_short_repr(tmp_path):
    long = "x" * 5000
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "long.yaml", f"data:\n  input_size: {long}\n"))
    assert len(str(info.value)) < 400 and "..." in str(info.value)


NON_FINITE_YAML = [".inf", "-.inf", ".nan", "1.0e+400", "-1.0e+400"]
NON_FINITE_SET = ["inf", "-inf", "nan", "1e400", "Infinity", "-1e999"]
FLOAT_KEYS = [(section, key) for section, cls in SECTIONS.items()
              for key, tp in typing.get_type_hints(cls).items() if tp is float]


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
def test_non_finite_floats_are_refused_for_every_float_key(tmp_path, section, key):
    assert len(FLOAT_KEYS) >= 15
    for text in NON_FINITE_YAML:
        path = write(tmp_path / "f.yaml", f"{section}:\n  {key}: {text}\n")
        with pytest.raises(ConfigError, match=f"'{section}.{key}' in {path}") as info:
            load_config(path)
        assert "expected a finite number" in str(info.value) or "must be" in str(info.value)
    for text in NON_FINITE_SET:
        with pytest.raises(ConfigError, match=f"'{section}.{key}' in --set") as info:
            load_config(None, [f"{section}.{key}={text}"])
        assert "expected a finite number" in str(info.value)


def test_non_finite_float_cli_exit_code(capsys):
    assert run.main(["config", "--config", "none", "--set", "optim.lr=1e400"]) == 2
    err = capsys.readouterr().err
    assert err == "config error: bad value for 'optim.lr' in --set: '1e400'; expected a " \
                  "finite number (inf and nan are refused)\n"


@pytest.mark.parametrize("name", ["a/b", "../up", "..", ".", "  ", "/abs", "a\\b", "x\0y"])
def test_train_name_must_be_one_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match="'train.name' in --set: .* must be one folder name"):
        load_config(None, [f"train.name={name}"])
    path = write(tmp_path / "n.yaml", f"train:\n  name: {yaml.safe_dump(name).split(chr(10))[0]}\n")
    with pytest.raises(ConfigError, match=f"'train.name' in {path}"):
        load_config(path)


def test_train_name_accepts_plain_names():
    for name in ("", "run-1", "my run", "a.b", "..x"):
        assert load_config(None, [f"train.name={name}"]).train.name == name


def test_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path / "broken.yaml", "train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f'in "{path}", line' in str(info.value)


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, ["optim.milestones=[2,5]", "model.clip_weights=/x.pt",
                             "ray.use_gpu=true", "data.eval_splits=val"])
    text = dump_config(cfg)
    assert config_from_dict(yaml.safe_load(text)) == cfg
    path = write(tmp_path / "dumped.yaml", text)
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(Config()))) == Config()


def test_replace_validates():
    cfg = replace(Config(), loss={"mode": "tree"})
    assert cfg.loss.mode == "tree" and cfg.train == Config().train
    with pytest.raises(ConfigError):
        replace(Config(), loss={"mode": "nope"})


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_experiment_loads_and_documents_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "run.py" in first


def test_cli_config_prints_resolved_yaml(capsys):
    assert run.main(["config", "--config", "none", "--set", "train.epochs=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 4
    assert config_from_dict(printed).train.epochs == 4


def test_cli_config_error_exit_code(capsys):
    assert run.main(["config", "--set", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err


def test_cli_help_for_each_subcommand(capsys):
    for name in run.COMMANDS:
        with pytest.raises(SystemExit) as info:
            run.main([name, "--help"])
        assert info.value.code == 0
        assert name in capsys.readouterr().out
