"""The private recommender, trained (model.kind = "profile", fedrec/models/profile.py):
before training it is exactly the one-release recommender; its release's ε is composed
into a user-level run's; it trains end to end under DP-FedAvg."""

import json
import shutil

import numpy as np
import pytest
import torch

from fedrec.data.pipeline import catalog_vectors
from fedrec.errors import FedrecError
from fedrec.experiments.sweep import user_sigma
from fedrec.models.build import build_model
from fedrec.models.profile import read_release
from fedrec.models.protocol import batch_inputs
from fedrec.models.saved import load_for_dataset
from fedrec.privacy.accounting import Accountant, user_epsilon
from fedrec.privacy.dp_popularity import dp_popularity, text_affinity
from tiny import run_inprocess

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture(scope="module")
def release(cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "release.json"
    body = dp_popularity(cfg, 4.0, 1e-5, draws=1, device_text=True)
    path.write_text(json.dumps(body))
    return path


def profile(cfg, release, **more):
    return cfg.override(**{"model.kind": "profile", "model.prior": str(release),
                           "model.dim": 4, "model.new-item-bias": -3.0, **more})


def test_before_training_it_is_the_release_recommender(cfg, prepared, release):
    c = profile(cfg, release)
    rel = read_release(str(release))
    model = build_model(c, prepared.item_emb.shape[1], prepared.split.n_items,
                        known=prepared.split.released).eval()
    E = torch.as_tensor(prepared.item_emb)
    histories = [prepared.split.history(u)[-model.max_len:]  # what a ranking input holds
                 for u in range(prepared.split.n_users)]
    got = model.score_all(E, batch_inputs(histories, model.max_len)).detach().numpy()
    En = catalog_vectors(c, prepared).astype(np.float64)
    En /= np.linalg.norm(En, axis=1, keepdims=True)
    prior = np.where(prepared.split.released, np.log(np.maximum(rel["counts"], 1.0)), -3.0)
    want = prior[None] + rel["weight"] * text_affinity(En, histories, rel["last"])
    assert np.allclose(got, want, atol=1e-4)


def test_every_position_reads_the_mean_of_its_last_items(cfg, prepared, release):
    model = build_model(profile(cfg, release), prepared.item_emb.shape[1],
                        prepared.split.n_items)
    k = model.last
    h = torch.randn(prepared.split.n_items, 4 + prepared.item_emb.shape[1])
    seq = torch.tensor([[-1, -1, 3, 5, 7, 2, 9, 4, 1, 0]])
    with torch.no_grad():
        model.gain[1] = 1.0
        got = model.states(h, seq)[0, :, 4:]
    for t in range(seq.shape[1]):
        items = [i for i in seq[0, max(0, t - k + 1):t + 1].tolist() if i >= 0]
        want = h[items, 4:].mean(0) if items else torch.zeros(h.shape[1] - 4)
        assert torch.allclose(got[t], want, atol=1e-5)


def test_training_moves_the_low_rank_term_from_zero(cfg, prepared, release):
    model = build_model(profile(cfg, release), prepared.item_emb.shape[1],
                        prepared.split.n_items, known=prepared.split.released).train()
    E = torch.as_tensor(prepared.item_emb)
    rows = batch_inputs([prepared.split.history(u)[:9] for u in range(4)], 9)
    model.loss(E, rows, torch.as_tensor(prepared.split.released)).backward()
    assert model.A.grad.abs().sum() > 0 and model.gain.grad.abs().sum() > 0
    assert sorted(n for n, _ in model.named_parameters()) == ["A", "B", "gain"]


def test_the_release_is_composed_into_the_users_epsilon(cfg, release):
    c = profile(cfg, release, **{"privacy.mode": "user", "privacy.noise-multiplier": 1.0,
                                 "privacy.delta": 1e-5})
    rel = read_release(str(release))
    acc = Accountant(c.privacy.accountant)
    acc.step(rel["noise-multiplier"], 1.0, 1)
    acc.step(1.0, 0.3, 5)
    assert user_epsilon(c, 5, 0.3) == pytest.approx(acc.epsilon(1e-5))
    plain = cfg.override(**{"privacy.mode": "user", "privacy.noise-multiplier": 1.0,
                            "privacy.delta": 1e-5})
    assert user_epsilon(c, 5, 0.3) > user_epsilon(plain, 5, 0.3)
    sigma = user_sigma(c.override(**{"fed.num-rounds": 5, "fed.clients-per-round": 4}), 12.0, 13)
    spent = user_epsilon(c.override(**{"privacy.noise-multiplier": sigma}), 5, 4 / 13)
    assert 11.9 <= spent <= 12.0
    with pytest.raises(FedrecError, match="release alone spends more"):
        user_sigma(c.override(**{"fed.num-rounds": 5, "fed.clients-per-round": 4}),
                   0.9 * rel["epsilon"], 13)


def test_bad_settings_are_one_clear_error(cfg, tmp_path):
    with pytest.raises(FedrecError, match="needs model.prior"):
        cfg.override(**{"model.kind": "profile"})
    with pytest.raises(FedrecError, match="privacy.mode = 'user' or 'none'"):
        cfg.override(**{"model.kind": "profile", "model.prior": "x.json",
                        "privacy.mode": "sample"})
    with pytest.raises(FedrecError, match="independent noise only"):
        cfg.override(**{"model.kind": "profile", "model.prior": "x.json", "privacy.mode": "user",
                        "privacy.noise": "tree", "fed.sampling": "balanced"})
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(FedrecError, match="'model.prior' = .* is not a release file"):
        read_release(str(bad))


def test_a_user_level_profile_run_completes_with_the_composed_epsilon(tiny_root, release):
    from tiny import tiny_config
    cfg = profile(tiny_config(tiny_root), release, **{
        "privacy.mode": "user", "privacy.noise-multiplier": 1.0, "privacy.delta": 1e-5,
        "privacy.max-grad-norm": 0.5, "fed.num-rounds": 2, "fed.clients-per-round": 4,
        "fed.run-dir": str(tiny_root / "profile-dp")})
    _, results = run_inprocess(cfg)
    assert results["status"] == "completed"
    trains = [r["train"] for r in results["rounds"] if "train" in r]
    assert [t["epsilon-max"] for t in trains] == pytest.approx(
        [user_epsilon(cfg, r, 4 / 13) for r in (1, 2)])
    assert "full/hr@10" in results["summary"]["best"]
    # The run directory carries its release: copied elsewhere, it still loads and ranks.
    copy = tiny_root / "profile-copy"
    shutil.copytree(cfg.fed.run_dir, copy)
    loaded, model, p = load_for_dataset(copy)
    assert loaded.model.prior == str(copy / "prior.json")
    assert json.loads((copy / "prior.json").read_text()) == json.loads(release.read_text())
    assert model.score_all(torch.as_tensor(p.item_emb), batch_inputs(
        [p.split.history(0)], model.max_len)).shape == (1, p.split.n_items)
