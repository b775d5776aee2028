"""Typed, validated experiment configuration.

One frozen dataclass per concern; :class:`Config` groups them. Defaults are the paper's settings
where the paper gives them (input 416, sigma 0.02, gamma warm-up 10 epochs, Adam, lr 1e-5 with
decay 0.1, 50 epochs). YAML files hold only overrides, organised by section::

    extends: synthref.yaml        # optional, relative to this file
    model:
      preset: tiny
    loss:
      mode: forest-gradcam

Resolution order (later wins): dataclass defaults, the ``extends`` chain (base first), the file,
then ``--set section.key=value`` overrides. Unknown keys, wrong types and bad values raise
:class:`ConfigError` naming the key, where it came from, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from gtms.modes import ABLATION_MODES, MODES

# data.max_image_pixels' default: Pillow's Image.MAX_IMAGE_PIXELS (1 GiB / 4 bytes / 3), the
# limit gtms.data.images applies before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# What --config (or a config argument) accepts to mean "no file": the built-in defaults.
NO_CONFIG = ("", "none")

DATASETS = ("synthref", "refcoco", "refcoco+", "refcocog")
# Values a YAML document may expand to, aliases counted as often as they are used. A config
# holds a few hundred; an alias bomb ("billion laughs", 0.5 KB) billions. Past this the file is
# refused while it is parsed, before any value is built.
MAX_YAML_NODES = 100_000


class ConfigError(ValueError):
    """A configuration key, type or value is not acceptable."""


def _check(predicate, message: str) -> dict:
    """Field metadata: a value check and the message shown when it fails."""
    return {"check": (predicate, message)}


def _positive(kind=int):
    return _check(lambda v: v > 0, f"must be a positive {kind.__name__}")


def _non_negative():
    return _check(lambda v: v >= 0, "must be >= 0")


def _folder_name(name: str) -> bool:
    """``train.name``: empty (a name is made up) or one folder name below ``train.run_dir``."""
    return name == "" or (name.strip() not in ("", ".", "..")
                          and not any(c in name for c in "/\\\0"))


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its shards are, and how inputs are shaped."""

    dataset: Literal["synthref", "refcoco", "refcoco+", "refcocog"] = "synthref"
    split_by: Literal["unc", "umd", "google"] = "unc"
    root: str = field(default="data/synthref", metadata=_check(bool, "must not be empty"))
    synthref_images: int = field(default=800, metadata=_positive())
    synthref_seed: int = 0
    synthref_difficulty: Literal["easy", "standard", "hard"] = "standard"
    input_size: int = field(
        default=416, metadata=_check(lambda v: v >= 32 and v % 32 == 0,
                                     "must be a multiple of 32 and >= 32"))
    word_len: int = field(default=17, metadata=_check(lambda v: 3 <= v <= 77,
                                                      "must be in [3, 77]"))
    train_split: str = "train"
    val_split: str = "val"
    eval_splits: tuple[str, ...] = ("val", "testA", "testB")
    limit_train_refs: int = field(default=0, metadata=_non_negative())
    limit_eval_refs: int = field(default=0, metadata=_non_negative())
    strict: bool = False
    # Images with more pixels are refused before decoding (header size); 0 = no limit.
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata=_non_negative())
    # Preprocessed splits (val first, then train) are kept in memory when their estimated size
    # fits this budget, and streamed through the actors every epoch otherwise. 0: always stream.
    memory_budget_mb: int = field(default=2048, metadata=_non_negative())


@dataclass(frozen=True)
class ModelConfig:
    """CRIS architecture preset and the weights it starts from."""

    preset: Literal["tiny", "rn50", "rn101"] = "rn101"
    clip_weights: Optional[str] = None
    init_checkpoint: Optional[str] = None
    freeze_backbone: bool = False


@dataclass(frozen=True)
class PseudoConfig:
    """GTMS pseudo-label generator (tree filter range)."""

    sigma: float = field(default=0.02, metadata=_check(lambda v: v > 0, "must be > 0"))
    # 0: the paper's soft P-hat (Eq. 4). In (0, 1]: P-hat = 1 where it reaches this fraction of
    # its in-box maximum, else 0 (ours; the soft label collapses, see gtms/pseudo/pseudo_label.py).
    binarize_at: float = field(default=0.0, metadata=_check(lambda v: 0 <= v <= 1,
                                                             "must be in [0, 1]"))
    # Where GradCAM's A comes from: "trained" = the towers being trained (the paper's Sec. 3.2);
    # "frozen" = a frozen copy of the towers the run started from, A computed once per sentence
    # and cached (ours: fine-tuning erodes the alignment GradCAM reads; gtms/pseudo/
    # attention_source.py and the README's "Table 2 on the laptop").
    attention_source: Literal["trained", "frozen"] = "trained"


@dataclass(frozen=True)
class LossConfig:
    """Supervision: the Table 2 ablation row and the gamma schedule of L_pix."""

    mode: str = field(default="forest-gradcam", metadata=_check(
        lambda v: v in MODES, "must be one of " + ", ".join(map(repr, ABLATION_MODES))
        + " (the registry in gtms/modes.py)"))
    gamma_max: float = field(default=1.0, metadata=_non_negative())
    gamma_warmup_epochs: float = field(default=10.0, metadata=_non_negative())
    gamma_schedule: Literal["linear", "constant", "cosine"] = "linear"
    # Epochs with gamma = 0 before the warm-up starts (ours; the paper has none).
    gamma_delay_epochs: float = field(default=0.0, metadata=_non_negative())
    # L_pix per box pixel: "l1" = |P - P-hat| (Eq. 7, the paper); "bce" = binary cross-entropy
    # of the logits against P-hat (ours: L1 through the sigmoid gives a pixel that is far from
    # its label almost no gradient, see gtms/pseudo/losses.py).
    pixel: Literal["l1", "bce"] = "l1"
    # Which pixels L_pix sums (both divided by the box's area): "box" (Eq. 7, the paper) or
    # "image" (ours: every pixel, the target 0 outside the box, so a prediction spilling out of
    # the box is penalised per pixel as box BCE does; see the README, "Table 2 on the laptop").
    pixel_region: Literal["box", "image"] = "box"
    # Weight of an auxiliary image-sentence contrastive loss (symmetric InfoNCE over the batch
    # between CLIP's global image embedding and the sentence feature; ours, 0 = off): a
    # candidate to keep the alignment GradCAM reads (gtms/pseudo/losses.py alignment_loss).
    align_weight: float = field(default=0.0, metadata=_non_negative())


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = field(default=1e-5, metadata=_check(lambda v: v > 0, "must be > 0"))
    backbone_lr_mult: float = field(default=1.0, metadata=_non_negative())
    weight_decay: float = field(default=0.0, metadata=_non_negative())
    milestones: tuple[int, ...] = (35,)
    lr_decay: float = field(default=0.1, metadata=_check(lambda v: 0 < v <= 1,
                                                         "must be in (0, 1]"))
    grad_clip: float = field(default=0.0, metadata=_non_negative())
    # fp16 autocast + grad scaler on CUDA (the training step; evaluation stays fp32).
    amp: bool = True
    # bfloat16 autocast in the training step on CPU (ours; ~1.4x faster on CPUs with AVX512-BF16
    # or AMX, measured in benchmarks.train_step; evaluation stays fp32).
    cpu_bf16: bool = False
    # Train the model and its image batches in channels-last layout (~1.2x faster convolutions
    # on CPU with oneDNN; the numbers match contiguous layout up to float rounding).
    channels_last: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Loop length, batch sizes, evaluation, logging and where runs are stored."""

    epochs: int = field(default=50, metadata=_positive())
    batch_size: int = field(default=16, metadata=_positive())
    eval_batch_size: int = field(default=32, metadata=_positive())
    seed: int = 0
    threshold: float = field(default=0.35, metadata=_check(lambda v: 0 < v < 1,
                                                           "must be in (0, 1)"))
    run_dir: str = "runs"
    # The run's folder under run_dir; empty: made from the date and the config.
    name: str = field(default="", metadata=_check(
        _folder_name, "must be one folder name: no '/' or '\\', not '.' or '..', not blank "
                      "(empty: a name is made from the date and the config)"))
    log_every: int = field(default=20, metadata=_positive())
    val_every: int = field(default=1, metadata=_positive())  # epochs; the last one always
    image_grid_every: int = field(default=5, metadata=_non_negative())
    # Checkpoints kept: this many best by val mean IoU plus the latest (gtms/backend/retention.py).
    keep_checkpoints: int = field(default=2, metadata=_positive())
    # Where each epoch's metrics go besides metrics.jsonl (gtms/tracking.py): tensorboard,
    # mlflow, wandb (the last two: pip install -r requirements-tracking.txt).
    trackers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = field(
        default=("tensorboard",), metadata=_check(lambda v: len(set(v)) == len(v),
                                                  "must not name a tracker twice"))
    # MLflow's store; empty: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db.
    tracking_uri: str = ""
    # MLflow experiment / W&B project name.
    tracking_project: str = field(default="gtms", metadata=_check(
        lambda v: v.strip() != "", "must not be empty"))
    # Also upload the best checkpoint's weights to the trackers (default: only its path).
    track_checkpoints: bool = False


@dataclass(frozen=True)
class RayConfig:
    """Ray resources. Local mode plans CPUs so workers, actors and reads cannot deadlock."""

    address: str = ""
    num_workers: int = field(default=1, metadata=_non_negative())
    use_gpu: Optional[bool] = None
    cpus_per_worker: float = field(default=1.0, metadata=_check(lambda v: v > 0, "must be > 0"))
    gpus_per_worker: float = field(default=1.0, metadata=_check(lambda v: v > 0, "must be > 0"))
    preprocess_actors: int = field(default=1, metadata=_positive())
    preprocess_actors_max: int = field(default=0, metadata=_non_negative())
    actor_cpus: float = field(default=1.0, metadata=_non_negative())
    # Rows per preprocessing-actor call; each call has a fixed Ray Data cost (measured: 8 rows
    # per call delivered 95 samples/s, 32 rows 500 samples/s on 2 cores).
    preprocess_batch_size: int = field(default=32, metadata=_positive())
    local_num_cpus: int = field(default=0, metadata=_non_negative())
    max_failures: int = field(default=0, metadata=_non_negative())


@dataclass(frozen=True)
class PretrainConfig:
    """SynthCLIP: CLIP-style contrastive pretraining of the preset's image and text towers on
    the dataset's train split (``run.py pretrain``), the stand-in for OpenAI's CLIP weights on
    SynthRef. With ``before_train``, ``run.py train`` pretrains once (cached beside the data)
    and starts from those weights when ``model.clip_weights`` is not set."""

    before_train: bool = False
    epochs: int = field(default=10, metadata=_positive())
    batch_size: int = field(default=128, metadata=_positive())
    lr: float = field(default=1e-3, metadata=_check(lambda v: v > 0, "must be > 0"))
    weight_decay: float = field(default=0.05, metadata=_non_negative())
    # Object-centred crops captioned "colour noun" beside the (scene, expression) pairs.
    crops: bool = True
    scenes: bool = True       # (scene, expression) pairs
    # Crop side in pixels (0 = data.input_size). 96 at input 160 shows an object at about the
    # scale it has in the scenes, for a third of the compute.
    crop_size: int = field(default=96, metadata=_non_negative())
    seed: int = 0
    limit_refs: int = field(default=0, metadata=_non_negative())


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# --------------------------------------------------------------------------- values


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}[tp]


def _coerce(tp, value: Any, *, from_cli: bool) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError. CLI strings get lenient parsing."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and value in ("null", "None", "~")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(inner, value, from_cli=from_cli)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise TypeError
        return value
    if origin is tuple:
        if from_cli and isinstance(value, str):
            value = _parse_yaml_text(value) if value.strip().startswith("[") else \
                value.split(",")
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError
        item = typing.get_args(tp)[0]
        return tuple(_coerce(item, v, from_cli=from_cli) for v in value)
    if from_cli and isinstance(value, str) and tp is float:
        try:
            return float(value)  # YAML 1.1 reads "5e-2" as a string
        except ValueError:
            raise TypeError from None
    if from_cli and isinstance(value, str) and tp is not str:
        value = _parse_yaml_text(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if tp is str:
        if from_cli and value is not None:
            return str(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


def _build_section(name: str, values: dict[str, Any], sources: dict[str, str]):
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, given in values.items():
        where = sources.get(key, "defaults")
        if key not in fields:
            raise ConfigError(f"unknown key '{name}.{key}' in {where}; allowed keys in "
                              f"'{name}': {', '.join(fields)}")
        try:
            value = _coerce(hints[key], given, from_cli=where == "--set")
        except (TypeError, yaml.YAMLError):
            raise ConfigError(f"bad value for '{name}.{key}' in {where}: {_shown(given)}; "
                              f"expected {_describe(hints[key])}") from None
        if not _finite(value):  # shown as given: 1e400 reads as inf
            raise ConfigError(f"bad value for '{name}.{key}' in {where}: {_shown(given)}; "
                              "expected a finite number (inf and nan are refused)")
        check = fields[key].metadata.get("check")
        if check and value is not None and not check[0](value):
            raise ConfigError(f"bad value for '{name}.{key}' in {where}: {_shown(value)} "
                              f"{check[1]}")
        kwargs[key] = value
    return cls(**kwargs)


def _finite(value: Any) -> bool:
    """False for a float (alone or in a tuple) that is inf, -inf or nan."""
    if isinstance(value, tuple):
        return all(map(_finite, value))
    return not isinstance(value, float) or math.isfinite(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def _shown(value: Any) -> str:
    """``repr(value)`` cut short (long strings, long or deeply nested lists), for messages."""
    return _SHORT.repr(value)


# --------------------------------------------------------------------------- files


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _ExpansionError(yaml.YAMLError):
    def __init__(self, message: str, mark):
        super().__init__(f"{message} (line {mark.line + 1}, column {mark.column + 1})")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the
    last value silently) and a document whose aliases expand to more than
    :data:`MAX_YAML_NODES` values (an alias bomb), counted while the file is parsed, before
    any value is built. Keys brought in by a ``<<`` merge may still be overridden."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        size = self._sizes.get(id(node))
        if size is None:
            if alias:  # its anchor is still being read: the value would contain itself
                raise _ExpansionError("an alias refers to the value that contains it", mark)
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) \
                else []
            size = self._sizes[id(node)] = 1 + sum(self._sizes[id(n)] for n in children)
        if size > MAX_YAML_NODES:
            raise _ExpansionError(f"its aliases expand to more than {MAX_YAML_NODES:,} values "
                                  "(an alias bomb?); refused before building them", mark)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKeyError(key, key_node.start_mark.line + 1, first[key])
                    first[key] = key_node.start_mark.line + 1
                except TypeError:  # unhashable: the base class reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's document (see :func:`parse_yaml_bytes`); a missing or unreadable file is
    a :class:`ConfigError` too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    return parse_yaml_bytes(data, str(path))


def parse_yaml_bytes(data: bytes, where: str) -> Any:
    """YAML bytes read as UTF-8 with :class:`UniqueKeyLoader`. Text that is not UTF-8, not
    YAML, or has a key written twice is a :class:`ConfigError` naming ``where``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{where} is not UTF-8 text: byte {data[err.start]:#04x} at line "
                          f"{line} (offset {err.start}); save the file as UTF-8") from None
    loader = UniqueKeyLoader(text)
    loader.name = where  # marks in YAML errors name the file
    try:
        return loader.get_single_data()
    except _DuplicateKeyError as err:
        raise ConfigError(f"{where}: duplicate key {err.key!r} at line {err.line} (first at "
                          f"line {err.first_line}); write each key once") from None
    except _ExpansionError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _parse_yaml_text(text: str) -> Any:
    """One ``--set`` value read as YAML by :class:`UniqueKeyLoader` (YAML errors propagate)."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """Return [(file, mapping)] for ``path`` and its ``extends`` chain, base first."""
    if path in chain:
        raise ConfigError(f"'extends' cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    doc = read_yaml_file(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(doc).__name__}")
    layers: list[tuple[Path, dict]] = []
    doc = dict(doc)
    base = doc.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"'extends' in {path} must be a file name")
        layers = _read_yaml((path.parent / base).resolve(), chain + (path,))
    return layers + [(path, doc)]


def _merge_layer(merged: dict, sources: dict, doc: dict, where: str) -> None:
    for section, values in doc.items():
        if section == "sweep":  # a sweep's search space: read by sweep_section, not config keys
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}' in {where}; allowed sections: "
                              f"{', '.join(SECTIONS)} (and 'extends', 'sweep')")
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' in {where} must be a mapping of keys")
        for key, value in values.items():
            merged[section][key] = value
            sources[section][key] = where


def split_key(dotted: str, where: str = "--set") -> tuple[str, str]:
    """``section.key`` -> ``(section, key)``; the one parser of dotted names (``--set``, sweep
    spaces, Tune trial parameters). An unknown section or key is a :class:`ConfigError`."""
    section, dot, key = str(dotted).strip().partition(".")
    if not dot or not key:
        raise ConfigError(f"{where}: expected section.key (e.g. pseudo.sigma), got {dotted!r}")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}' in {where}; allowed sections: "
                          f"{', '.join(SECTIONS)}")
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in fields:
        raise ConfigError(f"unknown key '{section}.{key}' in {where}; allowed keys in "
                          f"'{section}': {', '.join(fields)}")
    return section, key


def parse_override(text: str) -> tuple[str, str, str]:
    """Split ``section.key=value``."""
    name, sep, value = text.partition("=")
    if not sep or "." not in name:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    section, key = split_key(name, "--set")
    return section, key, value


def _resolve(layers: typing.Iterable[tuple[dict, str]], overrides: typing.Sequence[str]) -> Config:
    """Defaults <- each ``(mapping, where)`` layer in order <- ``--set`` overrides."""
    merged: dict[str, dict] = {s: {} for s in SECTIONS}
    sources: dict[str, dict] = {s: {} for s in SECTIONS}
    for doc, where in layers:
        _merge_layer(merged, sources, doc, where)
    for text in overrides:
        section, key, value = parse_override(text)
        _merge_layer(merged, sources, {section: {key: value}}, "--set")
    return Config(**{s: _build_section(s, merged[s], sources[s]) for s in SECTIONS})


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve defaults <- extends chain <- file <- ``--set`` overrides into a :class:`Config`."""
    layers = _read_yaml(Path(path).resolve()) if path is not None else []
    return _resolve(((doc, str(file)) for file, doc in layers), overrides)


def sweep_section(path: str | Path) -> tuple[Any, Path] | None:
    """The ``sweep:`` section of ``path`` or of the nearest file it extends, with that file;
    read by the same reader as the config (UTF-8, no duplicate keys, ``extends`` cycles)."""
    for file, doc in reversed(_read_yaml(Path(path).resolve())):
        if "sweep" in doc:
            return doc["sweep"], file
    return None


def config_from_dict(doc: dict, where: str = "<dict>",
                     overrides: typing.Sequence[str] = ()) -> Config:
    """Build a Config from a nested mapping (e.g. a checkpoint's saved config) and overrides."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, not {type(doc).__name__}")
    return _resolve([(doc, where)], overrides)


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict (tuples as lists) suitable for YAML/JSON."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
            for s in SECTIONS}


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text; ``config_from_dict(yaml.safe_load(text))`` == cfg."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **sections: dict) -> Config:
    """Return ``cfg`` with some keys changed, e.g. ``replace(cfg, loss={"mode": "tree"})``."""
    doc = config_to_dict(cfg)
    for section, values in sections.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}'")
        doc[section].update(values)
    return config_from_dict(doc, "<replace>")
