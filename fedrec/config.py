"""Typed run config.

Defaults live in one place, pyproject.toml's ``[tool.flwr.app.config]``. Flower hands the
apps that table (plus ``--run-config`` overrides) as a flat dict of dotted kebab-case keys;
``Config.from_flat`` parses it once into frozen dataclasses, rejecting unknown keys, wrong
types and out-of-range values with a message that names the key.

Size: every key's type, range and cross-key rule lives here on purpose, so a config is
validated in exactly one place before anything runs.
"""

import dataclasses
import math
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedrec.errors import FedrecError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    cache_dir: str
    item_template: str
    cold_fraction: float
    split_seed: int
    eval_negatives: int
    users: int  # > 0: the first `users` of a seeded permutation (nested subsets), 0 = all
    tie_order: str  # random (a seeded permutation of the catalog) | item-id
    graph: str      # item-features graph: a graph.csv / .kg file or its directory ("" = the dataset's)
    images: str     # item-features image: a CSV item,image (paths relative to it)


@dataclass(frozen=True)
class EncoderConfig:
    model_dir: str
    batch_size: int
    max_length: int
    vision_dir: str  # item-features image: a Hugging Face vision encoder directory


@dataclass(frozen=True)
class ModelConfig:
    kind: str
    dim: int
    hidden: int
    dropout: float
    id_embeddings: bool
    item_text: bool   # seq: items carry adapter(PLM text); false = ID-only (SASRec over IDs)
    layers: int       # seq: self-attention blocks
    heads: int        # seq: attention heads (divide model.dim)
    max_len: int      # seq: history items the encoder reads
    id_dropout: float  # seq with text and IDs: share of items trained without their ID vector
    new_item_bias: float  # seq with text and IDs: score offset of items without trained ID rows
    public_warm_start: int  # seq with text: epochs of pretraining on the public catalog (0 = off)
    prior: str        # profile: the DP popularity release file it starts from
    item_features: str  # seq with text: "text" (+ ",graph", ",image"): the frozen tables of an item
    graph_dim: int    # width of the hashed knowledge-graph vector
    graph_min_items: int  # a fact enters the vector if at least this many catalog items name its entity
    feature_combine: str  # sum | gate: how the feature adapters' outputs add up


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str
    lr: float
    batch_size: int
    window_stride: int  # training windows every this many items (0 or >= model.max-len: disjoint)
    weight_decay: float
    local_epochs: int
    seed: int


@dataclass(frozen=True)
class CentralConfig:
    optimizer: str  # its own optimizer: a device default never changes the reference
    epochs: int
    patience: int
    batch_size: int
    lr: float
    new_item_bias: float  # model.new-item-bias of the centralized model (its own score scale)


@dataclass(frozen=True)
class FedConfig:
    strategy: str
    num_rounds: int
    clients_per_round: int
    sampling: str  # uniform | balanced (fedrec/federation/strategy.py)
    eval_every: int
    select: str  # last | val: the round a result reports (fedrec/federation/run_store.py)
    proximal_mu: float
    server_lr: float
    server_tau: float
    server_lr_warmup: int   # rounds of linear warmup of the server lr (0 = off)
    server_lr_decay: str    # none | cosine (to 0 at fed.num-rounds)
    server_lr_ids: float    # multiplier of the server lr for the per-item ID tables (fedadam)
    run_dir: str
    min_nodes: int  # > 0: a real deployment (the server holds the catalog only)
    round_timeout: float
    min_replies: int
    max_update_norm: float
    trim_beta: float
    failure_rate: float
    failure_kind: str
    poison_rate: float
    resume: bool


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str              # none | sample (DP-SGD, unit: interaction) | user (DP-FedAvg, unit: user)
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float  # > 0: solve noise_multiplier for it; 0: use noise_multiplier
    delta: float
    accountant: str        # rdp | prv | gdp (Opacus accountants)
    clipping: str          # user mode: fixed (C = max-grad-norm) | adaptive (C tracks a quantile)
    clipped_quantile: float  # adaptive: target fraction of updates clipped
    clip_norm_lr: float    # adaptive: geometric step of C per round
    noise: str             # user mode: independent (each round) | tree (DP-FTRL tree aggregation)


@dataclass(frozen=True)
class SecaggConfig:  # secure aggregation (SecAgg+, fedrec/federation/secagg.py)
    enabled: bool
    num_shares: int                # odd, >= 3: an even number crashes Flower's SecAgg+ round
    reconstruction_threshold: int  # in [2, num_shares)
    clipping_range: float          # masked values are clipped to [-r, r] before quantisation
    quantization_range: int        # integer levels over [-r, r]


@dataclass(frozen=True)
class Config:
    data: DataConfig
    encoder: EncoderConfig
    model: ModelConfig
    train: TrainConfig
    central: CentralConfig
    fed: FedConfig
    privacy: PrivacyConfig
    secagg: SecaggConfig

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "Config":
        """Parse Flower's flat run_config ({"train.lr": 0.001, ...}); every key required."""
        _refuse_retired(flat)
        known = {key for key, _, _ in _schema()}
        unknown = sorted(set(flat) - known, key=str)  # keys may be any type: never crash
        if unknown:
            raise FedrecError(
                f"config: unknown key {_short(unknown[0])}; valid keys are listed under "
                "[tool.flwr.app.config] in pyproject.toml"
            )
        sections: dict[str, dict[str, Any]] = {}
        for key, section, field in _schema():
            if key not in flat:
                raise FedrecError(f"config: missing key '{key}'; add it to the run config")
            sections.setdefault(section, {})[field.name] = _coerce(key, flat[key], field.type)
        cfg = cls(**{f.name: f.type(**sections[f.name]) for f in fields(Config)})
        _validate(cfg)
        return cfg

    def to_flat(self) -> dict[str, Any]:
        return {key: getattr(getattr(self, sec), f.name) for key, sec, f in _schema()}

    def override(self, **changes: Any) -> "Config":
        """Return a copy with dotted keys changed: cfg.override(**{"train.lr": 0.01})."""
        return Config.from_flat({**self.to_flat(), **changes})


def uses_text(cfg: Config) -> bool:
    """Whether the model reads the frozen PLM item table (else it needs no encoding)."""
    return (cfg.model.kind == "seq" and cfg.model.item_text) or cfg.model.kind == "profile"


# The v1 model (an attention-pooled bag of history items, BCE with sampled negatives) and
# the keys only it read; its results stay in results/v1/ (docs/v1.md).
RETIRED_AFTER = "19bee52"  # the last commit that shipped it
RETIRED_KEYS = ("model.pooling", "model.user-embedding", "train.negatives", "train.loss",
                "privacy.pool-gradient")


def _refuse_retired(flat: Mapping[str, Any]) -> None:
    if flat.get("model.kind") == "text":
        raise FedrecError(f"config: model.kind = 'text' (the v1 pooled-bag model) was retired "
                          f"after commit {RETIRED_AFTER}; use model.kind = 'seq' (the default: "
                          "text + ID items read as a sequence), or check out that commit to "
                          "rerun v1")
    used = [k for k in RETIRED_KEYS if k in flat]
    if used:
        raise FedrecError(f"config: '{used[0]}' belonged to the v1 model, retired after commit "
                          f"{RETIRED_AFTER}; remove it (every model now trains with a full "
                          "softmax over the released items)")


def _schema() -> list[tuple[str, str, dataclasses.Field]]:
    """(dotted key, section name, field) for every leaf of the config."""
    return [(f"{sec.name}.{f.name.replace('_', '-')}", sec.name, f)
            for sec in fields(Config) for f in fields(sec.type)]


def _coerce(key: str, value: Any, typ: type) -> Any:
    ok = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
    )
    if not ok:
        raise FedrecError(
            f"config: '{key}' must be {typ.__name__}, got {type(value).__name__} "
            f"{_short(value)}")
    if typ is float:  # TOML allows nan/inf, and int -> float can overflow
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise FedrecError(f"config: '{key}' must be a finite number; got {_short(value)}")
    return typ(value)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # ints past Python's digit limit cannot be printed
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


_CHOICES = {
    "model.kind": ("seq", "fedmf", "profile"),
    "data.tie-order": ("random", "item-id"),
    "train.optimizer": ("adam", "sgd"),
    "central.optimizer": ("adam", "sgd"),
    "fed.strategy": ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"),
    "fed.failure-kind": ("raise", "nan", "shape", "keys", "mixed"),
    "privacy.mode": ("none", "sample", "user"),
    "privacy.accountant": ("rdp", "prv", "gdp"),
    "privacy.clipping": ("fixed", "adaptive"),
    "privacy.noise": ("independent", "tree"),
    "fed.sampling": ("uniform", "balanced"),
    "fed.select": ("last", "val"),
    "fed.server-lr-decay": ("none", "cosine"),
}
_SEED_MAX = 2**63  # numpy and torch both accept [0, 2**63)
_POSITIVE = ("encoder.batch-size", "encoder.max-length", "model.dim", "model.hidden", "model.layers", "model.heads", "model.max-len",
             "train.lr", "train.batch-size", "train.local-epochs", "central.epochs",
             "central.patience", "central.batch-size", "central.lr", "data.eval-negatives", "fed.num-rounds", "fed.eval-every",
             "fed.server-lr", "fed.server-lr-ids", "fed.server-tau", "fed.round-timeout")


def _validate(cfg: Config) -> None:
    flat = cfg.to_flat()
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise FedrecError(f"config: '{key}' must be one of {', '.join(choices)}; "
                              f"got {_short(flat[key])}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise FedrecError(f"config: '{key}' must be > 0; got {_short(flat[key])}")
    checks = [
        ("data.cold-fraction", 0.0 <= flat["data.cold-fraction"] < 1.0, "in [0, 1)"),
        ("data.users", flat["data.users"] >= 0, ">= 0 (0 = every user)"),
        ("model.dropout", 0.0 <= flat["model.dropout"] < 1.0, "in [0, 1)"),
        ("model.id-dropout", 0.0 <= flat["model.id-dropout"] < 1.0, "in [0, 1)"),
        ("model.public-warm-start", flat["model.public-warm-start"] >= 0, ">= 0 (0 = off)"),
        ("train.weight-decay", flat["train.weight-decay"] >= 0, ">= 0"),
        ("train.window-stride", flat["train.window-stride"] >= 0,
         ">= 0 (0 = model.max-len: disjoint windows)"),
        ("fed.clients-per-round", flat["fed.clients-per-round"] >= 0, ">= 0 (0 = every user)"),
        ("fed.proximal-mu", flat["fed.proximal-mu"] >= 0, ">= 0"),
        ("fed.server-lr-warmup", 0 <= flat["fed.server-lr-warmup"] < flat["fed.num-rounds"],
         (f">= 0 and < fed.num-rounds ({flat['fed.num-rounds']}): for a run this short set "
          "fed.server-lr-warmup=0 (no warmup)")),
        ("fed.min-nodes", flat["fed.min-nodes"] >= 0, ">= 0 (0 = simulation)"),
        ("fed.min-replies", flat["fed.min-replies"] >= 1, ">= 1"),
        ("fed.min-replies", not 0 < flat["fed.clients-per-round"] < flat["fed.min-replies"],
         f"<= fed.clients-per-round ({flat['fed.clients-per-round']})"),
        ("fed.max-update-norm", flat["fed.max-update-norm"] >= 0, ">= 0 (0 = off)"),
        ("fed.trim-beta", 0.0 <= flat["fed.trim-beta"] < 0.5, "in [0, 0.5)"),
        ("fed.failure-rate", 0.0 <= flat["fed.failure-rate"] <= 1.0, "in [0, 1]"),
        ("fed.poison-rate", 0.0 <= flat["fed.poison-rate"] <= 1.0, "in [0, 1]"),
        ("data.split-seed", 0 <= flat["data.split-seed"] < _SEED_MAX, "in [0, 2**63)"),
        ("train.seed", 0 <= flat["train.seed"] < _SEED_MAX, "in [0, 2**63)"),
        ("privacy.noise-multiplier", flat["privacy.noise-multiplier"] >= 0, ">= 0"),
        ("privacy.max-grad-norm", flat["privacy.max-grad-norm"] > 0, "> 0"),
        ("privacy.clipped-quantile", 0.0 <= flat["privacy.clipped-quantile"] <= 1.0,
         "in [0, 1]"),
        ("privacy.clip-norm-lr", flat["privacy.clip-norm-lr"] > 0, "> 0"),
        ("privacy.target-epsilon", flat["privacy.target-epsilon"] >= 0,
         ">= 0 (0 = use privacy.noise-multiplier)"),
        ("privacy.delta", 0.0 < flat["privacy.delta"] < 1.0, "in (0, 1), below 1/number of users"),
        ("data.dataset", bool(flat["data.dataset"].strip()), "a dataset name or directory"),
        ("model.graph-dim", flat["model.graph-dim"] >= 8, ">= 8 (e.g. 256)"),
        ("model.graph-min-items", flat["model.graph-min-items"] >= 1, ">= 1 (1 = every fact)"),
        ("model.feature-combine", flat["model.feature-combine"] in ("sum", "gate"),
         "sum or gate"),
        # -- secure aggregation (fedrec/federation/secagg.py) --
        ("secagg.num-shares",
         flat["secagg.num-shares"] >= 3 and flat["secagg.num-shares"] % 2 == 1,
         "odd and >= 3 (Flower's SecAgg+ crashes on an even number), e.g. 3 or 5"),
        ("secagg.reconstruction-threshold",
         2 <= flat["secagg.reconstruction-threshold"] < flat["secagg.num-shares"],
         f">= 2 and < secagg.num-shares ({flat['secagg.num-shares']})"),
        ("secagg.clipping-range", flat["secagg.clipping-range"] > 0, "> 0"),
        ("secagg.quantization-range", 2 <= flat["secagg.quantization-range"] < 2**32,
         "in [2, 2**32), e.g. 4194304 (2**22)"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise FedrecError(f"config: '{key}' must be {rule}; got {_short(flat[key])}")
    balanced = flat["fed.sampling"] == "balanced"
    tree = flat["privacy.noise"] == "tree"
    seq = flat["model.kind"] == "seq"
    conflicts = [  # (settings that do not go together, the message naming the fix)
        (seq and not (flat["model.item-text"] or flat["model.id-embeddings"]),
         "model.kind = 'seq' needs model.item-text = true, model.id-embeddings = true or both"),
        (seq and flat["model.dim"] % flat["model.heads"] != 0,
         f"'model.heads' ({flat['model.heads']}) must divide model.dim ({flat['model.dim']})"),
        (seq and flat["privacy.mode"] == "sample" and flat["fed.proximal-mu"] > 0
         and flat["fed.strategy"] == "fedprox",
         "privacy.mode = 'sample' does not support FedProx's proximal term; use fedadam or fedavg"),
        (flat["model.public-warm-start"] and not (seq and flat["model.item-text"]),
         ("'model.public-warm-start' pretrains the item adapter on catalog text: it needs "
          "model.kind = 'seq' with model.item-text = true; set it to 0")),
        (flat["model.public-warm-start"] and flat["fed.min-nodes"] > 0,
         ("'model.public-warm-start' runs on the server, and a deployed server does not run "
          "the PLM; set it to 0 for fed.min-nodes > 0")),
        (flat["model.item-features"].strip() != "text"
         and not (seq and flat["model.item-text"]),
         ("'model.item-features' beyond text needs model.kind = 'seq' with model.item-text = "
          "true; set it to \"text\"")),
        (flat["model.item-features"].strip() != "text" and flat["model.public-warm-start"],
         ("'model.public-warm-start' pretrains the text adapter alone; set it to 0 with "
          "model.item-features beyond text")),
        (not seq and not flat["model.item-text"],
         "model.item-text = false (ID-only items) is for model.kind = 'seq'"),
        (flat["privacy.clipping"] == "adaptive" and flat["secagg.enabled"],
         ("'privacy.clipping' = 'adaptive' does not work with secagg.enabled (the server would "
          "need each device's clipped bit in the clear); use privacy.clipping = 'fixed' with "
          "SecAgg+")),
        (flat["model.kind"] == "profile" and not flat["model.prior"],
         ("model.kind = 'profile' needs model.prior: the release file of `fedrec baseline "
          "popularity --epsilon E --device-text --json FILE`")),
        (flat["model.kind"] == "profile" and flat["privacy.mode"] == "sample",
         ("model.kind = 'profile' composes its user-level release with user-level training: "
          "use privacy.mode = 'user' or 'none'")),
        (flat["model.kind"] == "profile" and tree,
         ("model.kind = 'profile' composes its release with independent noise only; set "
          "privacy.noise = 'independent'")),
        (balanced and flat["privacy.mode"] == "user" and not tree,
         ("'fed.sampling' = 'balanced' does not work with privacy.mode = 'user' (its "
          "accountant's ε assumes each round samples devices at random); use fed.sampling = "
          "'uniform', or privacy.noise = 'tree'")),
        (tree and flat["privacy.mode"] != "user",
         "privacy.noise = 'tree' is DP-FTRL over user updates: set privacy.mode = 'user'"),
        (tree and flat["privacy.mode"] == "user" and not balanced
         and flat["fed.clients-per-round"] != 0,
         ("privacy.noise = 'tree' has no amplification by sampling: its accountant needs "
          "each device's joins spaced, fed.sampling = 'balanced' (or fed.clients-per-round "
          "= 0, every device every round)")),
        (tree and (flat["privacy.clipping"] == "adaptive" or flat["secagg.enabled"]),
         ("privacy.noise = 'tree' needs privacy.clipping = 'fixed' and secagg.enabled = "
          "false")),
        (balanced and flat["secagg.enabled"],
         ("'fed.sampling' = 'balanced' does not work with secagg.enabled (Flower's legacy "
          "SecAgg+ path samples devices itself); use fed.sampling = 'uniform'")),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise FedrecError(f"config: {message}")
    _check_template(flat["data.item-template"])


def _check_template(template: str) -> None:
    """Reject a malformed template now, not after the dataset is loaded."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise FedrecError(f"config: 'data.item-template' is not a valid template ({exc}); "
                          "write fields as {name} and literal braces as {{ }}") from None
    for _, name, _, _ in parts:
        if name is not None and not re.fullmatch(r"(?![\d\s])[^.\[]+", name):
            raise FedrecError(f"config: 'data.item-template' field {{{name}}} must be a plain "
                              "item field name such as {title}")


def parse_seeds(text: str) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FedrecError(f"--seeds: '{text}' is not a comma-separated list of integers") from None
    if not seeds:
        raise FedrecError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return seeds


def load_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The flat default table from pyproject.toml (what Flower passes as run_config)."""
    try:
        with open(pyproject, "rb") as fh:
            return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise FedrecError(f"{pyproject}: cannot read [tool.flwr.app.config] ({exc})") from None


# Flower's own --run-config syntax: key=value, where a quoted value may hold spaces.
_PAIR = re.compile(r"""\s*(?:([^\s=]+)=('[^']*'|"[^"]*"|\S+)|(\S+))""")


LOCATION_KEYS = ("fed.run-dir", "fed.resume")  # where a run lives, not what it computes
# Keys added after run directories were first written, each with the value that reproduces
# what a run stored without it did (add every new key here).
ADDED_KEYS = {"fed.server-tau": 1e-3,  # Flower FedAdam's own default, used before the key
              "privacy.clipping": "fixed", "privacy.clipped-quantile": 0.5,
              "privacy.clip-norm-lr": 0.2, "fed.sampling": "uniform",
              # v2 (recommender-v2): the keys of the seq model and central training
              "model.item-text": True, "model.layers": 2, "model.heads": 1,
              "model.max-len": 50, "central.optimizer": "adam",
              "model.id-dropout": 0.0,
              "model.new-item-bias": 0.0,  # accuracy issue: new items scored on the map alone
              "data.users": 0,  # population study (issue 14): 0 = every user
              "model.public-warm-start": 0,  # privacy levers (issue 14): off
              "fed.server-lr-warmup": 0, "fed.server-lr-decay": "none",  # constant server lr
              "fed.server-lr-ids": 1.0,  # one server lr for every parameter
              "data.tie-order": "item-id",  # equal timestamps were ordered by item id
              "train.window-stride": 0,  # disjoint windows
              # accuracy issue: the centralized model's own new-item offset (before it, the
              # centralized model used model.new-item-bias, at 0.4)
              "central.new-item-bias": 0.4,
              "fed.select": "val",  # accuracy issue: the best validation round was reported
              "privacy.noise": "independent",  # privacy frontier: fresh noise every round
              "model.prior": "",  # privacy frontier: no release file
              # multimodal items: text alone
              "model.item-features": "text", "model.graph-dim": 256, "model.graph-min-items": 1,
              "model.feature-combine": "sum", "data.graph": "", "data.images": "",
              "encoder.vision-dir": ""}


def stored_config(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A run directory's stored flat config, completed with ADDED_KEYS it predates and
    without the keys retired since (a v1 model's config is refused), so older runs can
    still be resumed, extended and compared."""
    _refuse_retired({"model.kind": flat.get("model.kind")})
    return {**ADDED_KEYS, **{k: v for k, v in flat.items() if k not in RETIRED_KEYS}}


def run_identity(flat: Mapping[str, Any], *more: str) -> dict[str, Any]:
    """A (stored) flat config without LOCATION_KEYS (and `more`): equal for two runs that
    compute the same thing, wherever their directories are and whichever keys they predate."""
    drop = set(LOCATION_KEYS) | set(more)
    return {k: v for k, v in stored_config(flat).items() if k not in drop}


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse Flower-style overrides 'train.lr=0.01 model.dim=32' with TOML value syntax."""
    out: dict[str, Any] = {}
    for m in _PAIR.finditer(text.strip()):
        key, raw, bad = m.groups()
        if bad is not None:
            raise FedrecError(f"--run-config: '{bad}' is not key=value (e.g. train.lr=0.01)")
        key = key.strip("\"'")  # a TOML-quoted key means the same key
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except (ValueError, RecursionError):
            out[key] = raw  # bare words are strings (flwr needs quotes; we forgive them)
    return out


def load_config(overrides: Mapping[str, Any] | None = None, toml_file: str | None = None
                ) -> Config:
    """Defaults from pyproject, then a TOML override file, then key=value overrides."""
    flat = load_defaults()
    if toml_file:
        try:
            with open(toml_file, "rb") as fh:
                flat.update(_flatten(tomllib.load(fh)))
        except FileNotFoundError:
            raise FedrecError(f"--config: file '{toml_file}' does not exist") from None
        except OSError as exc:
            raise FedrecError(f"--config: cannot read '{toml_file}' ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise FedrecError(f"--config: '{toml_file}' is not valid TOML ({exc})") from None
    flat.update(overrides or {})
    return Config.from_flat(flat)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
