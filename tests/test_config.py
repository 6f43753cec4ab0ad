"""Config: defaults parse, bad values are rejected by key, overrides round-trip."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.config import (
    RETIRED_KEYS,
    Config,
    load_config,
    load_defaults,
    parse_overrides,
    stored_config,
)
from fedrec.errors import FedrecError

DEFAULTS = load_defaults()


def test_defaults_parse_and_round_trip():
    cfg = Config.from_flat(DEFAULTS)
    assert cfg.to_flat() == DEFAULTS
    assert cfg == load_config()
    assert cfg.train.lr == DEFAULTS["train.lr"] and cfg.model.kind == "seq"
    assert cfg.data.eval_negatives == 99


def test_reliability_keys_accept_their_edges():
    cfg = Config.from_flat(DEFAULTS)
    edge = cfg.override(**{"fed.failure-rate": 1.0, "fed.poison-rate": 0.0, "fed.trim-beta": 0.0,
                           "fed.min-replies": 94, "fed.max-update-norm": 0.5,
                           "fed.strategy": "fedtrimmedavg", "fed.failure-kind": "mixed"})
    assert (edge.fed.failure_rate, edge.fed.min_replies, edge.fed.strategy) == (1.0, 94, "fedtrimmedavg")
    # every user per round (0): any minimum is allowed, the population is not known here
    assert cfg.override(**{"fed.clients-per-round": 0, "fed.min-replies": 500}).fed.min_replies == 500
    assert cfg.fed.round_timeout == 3600.0 and cfg.fed.min_replies == 1 and not cfg.fed.resume


def test_override_round_trips():
    cfg = Config.from_flat(DEFAULTS)
    new = cfg.override(**{"train.lr": 0.01, "model.kind": "fedmf", "data.cold-fraction": 0})
    assert (new.train.lr, new.model.kind, new.data.cold_fraction) == (0.01, "fedmf", 0.0)
    assert isinstance(new.data.cold_fraction, float)
    assert new.override(**{k: v for k, v in cfg.to_flat().items()}) == cfg
    assert Config.from_flat(new.to_flat()) == new
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.train.lr = 1.0  # frozen


@pytest.mark.parametrize("key,value,match", [
    ("train.bogus", 1, "unknown key 'train.bogus'"),
    ("train.lr", "fast", "'train.lr' must be float"),
    ("model.dim", 64.0, "'model.dim' must be int"),
    ("model.dim", True, "'model.dim' must be int"),
    ("model.id-embeddings", 1, "'model.id-embeddings' must be bool"),
    ("train.lr", 0.0, "'train.lr' must be > 0"),
    ("train.lr", -1e-3, "'train.lr' must be > 0"),
    ("train.lr", math.nan, "'train.lr' must be a finite number"),
    ("train.lr", 10**400, "'train.lr' must be a finite number"),
    ("data.cold-fraction", 1.0, r"'data.cold-fraction' must be in \[0, 1\)"),
    ("data.cold-fraction", -0.1, r"'data.cold-fraction' must be in \[0, 1\)"),
    ("model.kind", "mf", "'model.kind' must be one of seq, fedmf"),
    ("data.split-seed", -1, "'data.split-seed' must be in"),
    ("data.dataset", " ", "'data.dataset' must be"),
    ("data.item-template", "{title", "'data.item-template' is not a valid template"),
    ("data.item-template", "{0}", "'data.item-template' field {0}"),
    ("fed.strategy", "krum", "'fed.strategy' must be one of fedavg, fedprox, fedadam, fedmedian"),
    ("fed.round-timeout", 0.0, "'fed.round-timeout' must be > 0"),
    ("fed.round-timeout", "60", "'fed.round-timeout' must be float"),
    ("fed.min-replies", 0, "'fed.min-replies' must be >= 1"),
    ("fed.min-replies", 95, r"'fed.min-replies' must be <= fed.clients-per-round \(94\)"),
    ("fed.max-update-norm", -1.0, r"'fed.max-update-norm' must be >= 0 \(0 = off\)"),
    ("fed.trim-beta", 0.5, r"'fed.trim-beta' must be in \[0, 0.5\)"),
    ("fed.trim-beta", -0.1, r"'fed.trim-beta' must be in \[0, 0.5\)"),
    ("fed.failure-rate", 1.5, r"'fed.failure-rate' must be in \[0, 1\]"),
    ("fed.failure-rate", -0.1, r"'fed.failure-rate' must be in \[0, 1\]"),
    ("fed.failure-kind", "crash", "'fed.failure-kind' must be one of raise, nan, shape, keys, mixed"),
    ("fed.poison-rate", 2.0, r"'fed.poison-rate' must be in \[0, 1\]"),
    ("fed.resume", 1, "'fed.resume' must be bool"),
])
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(FedrecError, match=match):
        Config.from_flat({**DEFAULTS, key: value})


def test_balanced_sampling_is_refused_where_random_sampling_is_assumed():
    ok = Config.from_flat({**DEFAULTS, "fed.sampling": "balanced", "privacy.mode": "sample"})
    assert ok.fed.sampling == "balanced"
    for extra, match in (({"privacy.mode": "user"}, r"privacy.mode = 'user'.*use fed.sampling"),
                         ({"secagg.enabled": True}, r"secagg.enabled.*use fed.sampling")):
        with pytest.raises(FedrecError, match=r"'fed.sampling' = 'balanced' does not work "
                                              r"with " + match) as exc:
            Config.from_flat({**DEFAULTS, "fed.sampling": "balanced", **extra})
        assert "\n" not in str(exc.value)


def test_the_retired_v1_model_and_its_keys_stop_in_one_line_naming_the_commit():
    with pytest.raises(FedrecError, match=r"model.kind = 'text' .* retired after commit "
                                          r"19bee52; use model.kind = 'seq'") as exc:
        Config.from_flat({**DEFAULTS, "model.kind": "text"})
    assert "\n" not in str(exc.value)
    for key in RETIRED_KEYS:
        with pytest.raises(FedrecError, match=rf"'{key}' belonged to the v1 model, retired "
                                              r"after commit 19bee52; remove it"):
            Config.from_flat({**DEFAULTS, key: 4})
    # a stored run of a kept model still loads without the keys it carried then
    old = {**DEFAULTS, "model.pooling": "attention", "train.negatives": 4}
    assert Config.from_flat(stored_config(old)) == Config.from_flat(DEFAULTS)
    with pytest.raises(FedrecError, match="retired"):
        stored_config({**old, "model.kind": "text"})


def test_missing_key_is_named():
    flat = dict(DEFAULTS)
    del flat["train.seed"]
    with pytest.raises(FedrecError, match="missing key 'train.seed'"):
        Config.from_flat(flat)


def test_parse_overrides():
    assert parse_overrides("a.b=1 c.d=true e.f=word") == {"a.b": 1, "c.d": True, "e.f": "word"}
    assert parse_overrides("  train.lr=1e-2\tx=0.5 ") == {"train.lr": 0.01, "x": 0.5}
    assert parse_overrides("data.item-template='{title} ({year})' m=\"a b\"") == \
        {"data.item-template": "{title} ({year})", "m": "a b"}
    assert parse_overrides('"train.lr"=0.1') == {"train.lr": 0.1}
    assert parse_overrides("") == {}
    for bad in ("train.lr", "=3", "a=1 oops"):
        with pytest.raises(FedrecError, match="is not key=value"):
            parse_overrides(bad)


def test_load_config_layers(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('"model.dim" = 8\n[train]\nlr = 0.05\n')
    cfg = load_config({"train.seed": 3}, str(toml))
    assert (cfg.train.lr, cfg.model.dim, cfg.train.seed) == (0.05, 8, 3)
    for path, match in ((tmp_path / "nope.toml", "does not exist"), (tmp_path, "cannot read")):
        with pytest.raises(FedrecError, match=match):
            load_config(None, str(path))
    (tmp_path / "bad.toml").write_text("lr = = 1")
    with pytest.raises(FedrecError, match="not valid TOML"):
        load_config(None, str(tmp_path / "bad.toml"))
    with pytest.raises(FedrecError, match="cannot read"):
        load_defaults(tmp_path / "pyproject.toml")


KEYS = sorted(DEFAULTS)
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-10**400, 10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["text", "fedmf", "bce", "bpr", "mean", "{title}", "{", "}{", "{0}"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2))
KEY = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers())


def _valid_or_fedrec_error(fn):
    try:
        cfg = fn()
    except FedrecError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(cfg, Config) and Config.from_flat(cfg.to_flat()) == cfg


@settings(max_examples=700, deadline=None)
@given(st.dictionaries(KEY, VALUES, max_size=4))
def test_generated_override_dicts(changes):
    _valid_or_fedrec_error(lambda: Config.from_flat({**DEFAULTS, **changes}))


TOKEN = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
              st.one_of(st.text(max_size=10), st.integers().map(str),
                        st.floats().map(repr), st.sampled_from(
                            ["true", "nan", "inf", "'a b'", '"x"', "[1]", "{a=1}", "1979-05-27",
                             "0x10", "1_000", "'{title}'", '"', "'"]))),
    st.text(max_size=8))


@settings(max_examples=500, deadline=None)
@given(st.lists(TOKEN, max_size=4).map(" ".join))
def test_generated_override_strings(text):
    _valid_or_fedrec_error(lambda: load_config(parse_overrides(text)))


def test_every_experiment_config_parses():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "simulations" / "configs").glob("*.toml"))
    assert len(configs) >= 5
    for path in configs:
        load_config(toml_file=str(path))  # unknown keys or bad values raise FedrecError
