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
from fedrec.federation.simulate import write_overrides
from fedrec.privacy.accounting import gaussian_delta, gaussian_sigma
from fedrec.privacy.dp_popularity import bounded_counts, dp_popularity, text_affinity
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
    from fedrec.errors import FedrecError
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
    assert priv["noise-multiplier"] == pytest.approx(gaussian_sigma(2.0, 1e-4))
    assert len(res["runs"]) == 2 and "full/hr@10" in res["summary"]["best"]
    # Unreleased items are never listed; huge ε gives the plain popularity ranking's hits.
    assert res["summary"]["best"]["top10/unreleased-share"]["mean"] == 0.0
    loose = dp_popularity(cfg, 1e4, 1e-4, bounds=(1000,), draws=1)["summary"]["best"]
    from fedrec.models.baselines import popularity
    plain = popularity(cfg, [cfg.data.split_seed])["summary"]["best"]
    assert loose["full/hr@10"]["mean"] == pytest.approx(plain["full/hr@10"]["mean"])
    code, _, err = run_cli("baseline", "popularity", "--epsilon", "0",
                           "--config", str(cfg_file(cfg, tmp_path)))
    assert code != 0 and "--epsilon" in err and "Traceback" not in err


def cfg_file(cfg, tmp_path):
    return write_overrides(tmp_path / "tiny.toml", {**TINY, **{
        k: v for k, v in cfg.to_flat().items() if k.startswith(("data.", "encoder."))}})


def test_device_text_reranks_the_release_by_each_history_at_no_cost_in_epsilon(cfg):
    plain = dp_popularity(cfg, 4.0, 1e-4, draws=2)
    dev = dp_popularity(cfg, 4.0, 1e-4, draws=2, device_text=True)
    assert dev["method"] == "dp-popularity+device-text"
    for key in ("epsilon", "delta", "noise-multiplier", "bound"):  # the same one release
        assert dev["privacy"][key] == plain["privacy"][key]
    chosen = dev["privacy"]["device-text"]
    sel = dev["privacy"]["device-text"]["selection"]
    assert sel[f"{chosen['weight']:g},{chosen['last']}"] == max(sel.values())
    # weight 0 is the release's own ranking: its validation score is plain popularity's.
    assert sel["0,3"] == pytest.approx(plain["privacy"]["bound-selection"][str(plain["privacy"]["bound"])])
    assert dev["summary"]["best"]["top10/unreleased-share"]["mean"] == 0.0


def test_text_affinity_is_the_cosine_with_the_mean_of_the_last_items():
    E = np.eye(4)
    aff = text_affinity(E, [np.array([0, 1, 2]), np.array([3])], last=2)
    assert aff.tolist() == [[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]
