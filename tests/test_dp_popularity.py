"""User-level DP popularity (fedrec.privacy.dp_popularity): its noise is calibrated
exactly for one Gaussian release (checked against dp-accounting's PLD accountant, and
shown to reject a 3% error in σ), one user moves the counts by at most sqrt(bound), and
the command writes a result a private model can be compared with."""

import json

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedrec.data.protocol import Split
from fedrec.errors import FedrecError
from fedrec.federation.simulate import write_overrides
from fedrec.privacy.dp_popularity import (
    bounded_counts,
    contributors,
    dp_popularity,
    release_audit,
    text_affinity,
)
from fedrec.privacy.exact import gaussian_delta, gaussian_sigma
from tiny import TINY

CASES = [(1.0, 1e-4), (2.0, 1e-4), (4.0, 1e-4), (8.0, 1e-4), (0.5, 1e-5)]


def pld_epsilon(sigma: float, delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.GaussianDpEvent(sigma))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("epsilon,delta", CASES)
def test_sigma_is_exact_for_one_gaussian_release(epsilon, delta):
    sigma = gaussian_sigma(epsilon, delta)
    assert gaussian_delta(epsilon, sigma) == pytest.approx(delta, rel=1e-6)
    assert pld_epsilon(sigma, delta) == pytest.approx(epsilon, rel=0.01)
    # The check has teeth: 3% less noise is visibly more ε to the independent accountant.
    assert pld_epsilon(0.97 * sigma, delta) > 1.02 * epsilon


def test_bad_epsilon_or_delta_is_one_clear_error():
    for eps, delta in ((0.0, 1e-4), (-1.0, 1e-4), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(FedrecError, match="--epsilon"):
            gaussian_sigma(eps, delta)


def _split(histories: list[list[int]], n_items: int) -> Split:
    ptr = np.cumsum([0] + [len(h) for h in histories])
    n = len(histories)
    empty = np.full((n, 1), -1, np.int64)
    return Split(n_items=n_items, train_items=np.array([i for h in histories for i in h], np.int64),
                 train_ptr=ptr, val=np.full(n, -1), test=np.full(n, -1),
                 cold=np.zeros(n_items, bool), val_negatives=empty, test_negatives=empty)


def test_each_user_adds_at_most_bound_distinct_recent_items():
    hist = [[0, 1, 2, 1, 3], [4, 4, 4], [5, 0]]
    split = _split(hist, 6)
    # bound 2: user 0's two most recent distinct items (3, 1), user 1's (4), user 2's (0, 5).
    assert bounded_counts(split, 2).tolist() == [1, 1, 0, 1, 1, 1]
    assert bounded_counts(split, 100).tolist() == [2, 1, 1, 1, 1, 1]
    # Removing any one user moves the counts by at most sqrt(bound) in L2.
    for bound in (1, 2, 3):
        full = bounded_counts(split, bound)
        for u in range(3):
            rest = _split([h for v, h in enumerate(hist) if v != u], 6)
            assert np.linalg.norm(full - bounded_counts(rest, bound)) <= np.sqrt(bound) + 1e-12


pytestmark = pytest.mark.usefixtures("isolated")


def test_the_command_writes_a_private_row_with_its_unit_and_noise(cfg, run_cli, tmp_path):
    out = tmp_path / "dp.json"
    code, _, err = run_cli("baseline", "popularity", "--epsilon", "2", "--draws", "2",
                              "--config", str(cfg_file(cfg, tmp_path)), "--json", str(out))
    assert code == 0, err
    res = json.loads(out.read_text())
    priv = res["privacy"]
    assert (res["method"], priv["unit"], priv["epsilon"], priv["delta"]) == \
        ("dp-popularity", "user", 2.0, 1e-4)
    assert priv["noise-std"] == pytest.approx(priv["noise-multiplier"] * np.sqrt(priv["bound"]))
    assert priv["noise-multiplier"] == pytest.approx(gaussian_sigma(priv["epsilon-spent"], 1e-4))
    assert priv["epsilon-spent"] <= 2.0 and 0.4 < priv["audit"]["best"] <= 1.0
    assert len(res["runs"]) == 2 and "full/hr@10" in res["summary"]["best"]
    # Unreleased items are never listed; huge ε gives the plain popularity ranking's hits.
    assert res["summary"]["best"]["top10/unreleased-share"]["mean"] == 0.0
    loose = dp_popularity(cfg, 1e4, 1e-4, bounds=(1000,), draws=1)["summary"]["best"]
    from fedrec.models.baselines import popularity
    plain = popularity(cfg, [cfg.data.split_seed])["summary"]["best"]
    # (the noise breaks ties among equal counts in its own order: one user may differ)
    assert loose["full/hr@10"]["mean"] == pytest.approx(plain["full/hr@10"]["mean"], abs=0.09)
    code, _, err = run_cli("baseline", "popularity", "--epsilon", "0",
                           "--config", str(cfg_file(cfg, tmp_path)))
    assert code != 0 and "--epsilon" in err and "Traceback" not in err
    code, _, err = run_cli("baseline", "popularity", "--epsilon", "2", "--unit", "item",
                           "--config", str(cfg_file(cfg, tmp_path)))
    assert code != 0 and "--unit" in err and "Traceback" not in err
    # `fedrec audit` on the release file: the exact counts beside the release.
    code, text, err = run_cli("audit", "--model", str(out), "--users", "200",
                              "--json", str(tmp_path / "audit.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "audit.json").read_text())["rows"]
    assert [r["epsilon"] for r in rows] == [None, 2.0] and "the release" in text
    assert rows[0]["auc"]["informed"] == 1.0 and rows[0]["best"]["auc"] == 1.0
    assert rows[1]["auc"] == priv["audit"]["auc"]  # the command's own audit: same users
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = run_cli("audit", "--model", str(tmp_path / "bad.json"))
    assert code != 0 and "is not a release file" in err and "Traceback" not in err


def cfg_file(cfg, tmp_path):
    return write_overrides(tmp_path / "tiny.toml", {**TINY, **{
        k: v for k, v in cfg.to_flat().items() if k.startswith(("data.", "encoder."))}})


def test_device_text_reranks_a_release_by_each_history_at_no_further_epsilon(cfg):
    plain = dp_popularity(cfg, 4.0, 1e-4, draws=2)
    dev = dp_popularity(cfg, 4.0, 1e-4, draws=2, device_text=True)
    assert dev["method"] == "dp-prior+device-text"
    priv = dev["privacy"]
    assert (priv["epsilon"], priv["delta"]) == (4.0, 1e-4)
    assert 0 < priv["epsilon-spent"] <= priv["epsilon"]
    assert priv["noise-multiplier"] == pytest.approx(gaussian_sigma(priv["epsilon-spent"], 1e-4))
    # The release: bound and share of ε with the best validation full HR@10.
    val = priv["selection"]
    chosen = f"{priv['bound']},{priv['epsilon-spent'] / 4.0:g}"
    assert val[chosen] == max(val.values())
    text = priv["device-text"]
    sel = text["selection"]
    assert sel[f"{text['weight']:g},{text['last']}"] == max(sel.values())
    # weight 0 is the release's own ranking: the baseline's validation at the same release
    # (the same noise draws).
    assert sel["0,3"] == pytest.approx(plain["privacy"]["selection"][chosen])
    assert dev["summary"]["best"]["top10/unreleased-share"]["mean"] == 0.0


def test_block_unit_counts_each_block_of_positions_once():
    hist = [[0, 1, 2, 1, 3], [4, 4, 4]]
    split = _split(hist, 5)
    # blocks of 3 positions: [0, 1, 2], [1, 3]; [4, 4, 4] (distinct: 4).
    assert [b.tolist() for b in contributors(split, "block", 3)] == [[2, 1, 0], [3, 1], [4]]
    assert bounded_counts(split, 2, "block", 3).tolist() == [0, 2, 1, 1, 1]
    with pytest.raises(FedrecError, match="--unit"):
        contributors(split, "item", 3)


def test_the_release_audit_separates_members_exactly_without_noise_and_not_under_noise():
    rng = np.random.default_rng(0)
    hist = [list(rng.choice(40, 8, replace=False)) for _ in range(60)]
    split = _split(hist, 40)
    counts = bounded_counts(split, 8)
    exact = release_audit(split, counts, counts, 8, users=30)
    assert exact["auc"]["informed"] == 1.0 == exact["auc-non-private"]["informed"]
    noisy = release_audit(split, counts, counts + rng.normal(0, 200.0, 40), 8, users=30)
    assert abs(noisy["auc"]["informed"] - 0.5) < 0.1
    assert noisy["auc-non-private"]["informed"] == 1.0


def test_text_affinity_is_the_cosine_with_the_mean_of_the_last_items():
    E = np.eye(4)
    aff = text_affinity(E, [np.array([0, 1, 2]), np.array([3])], last=2)
    assert aff.tolist() == [[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]
