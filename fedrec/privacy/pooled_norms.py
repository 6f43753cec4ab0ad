"""Exact per-row clipped gradients of the history-pooled text model without per-row
gradients (privacy.pool-gradient = "full"): ghost norms through a shared history pool.

A DP-SGD row r of one user's batch is a positive p_r (from the history H, |H| = L) with
its negatives; its loss reads the leave-one-out attention pool over the *whole* history,
  u_r = sum_{j != p_r} alpha_rj h_j,   alpha_r = softmax_{j != p_r}(a_j),
so every history item's trip through the item tower (item adapter, attention) is part of
every row's gradient. torch.func pays for that with one backward pass over the history
per row. Here the history part of every row's gradient is written in closed form.

Let delta_r = dL_r/du_r, kappa_r = <delta_r, u_r>, eta_rj = <delta_r, h_j> - kappa_r.
Then dL_r/dh_j = alpha_rj delta_r (value path) and dL_r/da_j = alpha_rj eta_rj
(attention path), and at history item j every Linear layer of the item tower gets the
output gradient alpha_rj psi_rj with
  psi_rj = P_j delta_r + eta_rj q_j,
a fixed per-item map P_j and vector q_j:
  adapter output layers (mlp[-1], skip): P_j = I, q_j = v_j = da_j/dh_j;
  adapter input layer mlp[0]:            P_j = diag(mu_j) W2^T, q_j = mu_j * (W2^T v_j),
                                         mu_j = d(dropout(gelu(z)))/dz at item j;
  attention layers:                      P_j = 0, q_j = da_j/d(layer output).
With a shared weight profile w (w_j = exp(a_j - max a)), alpha_rj = lam_r w_j - nu_r [j = p_r]
(lam_r = 1 / sum_{j != p_r} w_j, nu_r = lam_r w_{p_r}). So row r's gradient of a layer is
  G_r = sum_i outer(g_ri, x_ri) + lam_r M_r,   M_r = sum_j w_j outer(psi_rj, A_j),
where the instances i are the row's candidates (output gradients from one backward pass)
and one "left-out" instance (output gradient -nu_r psi_{r,p_r}, input A_{p_r}), and A_j
is the layer's input at history item j. Its squared norm
  |sum_i ...|^2 + 2 lam_r sum_i g_ri^T M_r x_ri + lam_r^2 |M_r|^2
needs only Gram matrices: <outer(g, x), M_r> = sum_j w_j <psi_rj, g> <A_j, x>, and
|M_r|^2 = sum_{j,j'} w_j w_j' <A_j, A_j'> <psi_rj, psi_rj'>, whose parts are shared L x L
products (K = A A^T times w w^T) contracted with each row's delta_r, eta_r (the formulas in
_tower_sq). A row whose positive is the history's sole strong attention item
(sum_{j != p_r} w_j < 1/2) would cancel catastrophically in lam_r M_r - nu_r(...): those rows
(they all leave out the same argmax item) use a second profile, the weights renormalised
without that item, and no left-out instance.

The clipped sum sum_r s_r G_r (s_r = min(1, C / |G_r|)) then needs no second backward
pass (book-keeping, Bu et al.): each layer's weight gradient is (output gradients)^T
(inputs) over the candidates, their output gradients scaled by s_r, and the history items,
whose output gradient is sum_r s_r alpha_rj psi_rj. Cost per step: a forward pass, a
backward pass that stops at the pool, the Grams (~L^2 x the tower's widths, the item text's
cached across steps) and one matmul per layer, instead of a backward pass over the history
per row. Equal to torch.func's per-row gradients (tests/test_privacy.py);
simulations/bench_dp.py measures the cost.
"""

import numpy as np
import torch

from fedrec.models.build import TextRec, pool_leave_one_out
from fedrec.models.train import Histories, row_losses


def pooled_path_ok(model) -> bool:
    """The text model with a history-pooled user tower and no per-item ID vectors (those
    also run through the pool; torch.func handles them)."""
    return isinstance(model, TextRec) and model.uses_history and model.id_emb is None


def _ones(a: torch.Tensor) -> torch.Tensor:
    """A layer's inputs with a constant 1 appended: its bias is then one more weight column."""
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)


def instance_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|sum_i outer(g_ri, x_ri)|^2 per row (the ghost norm of a Linear layer whose row r
    sees inputs x_ri): inputs x [b, n, in], output gradients g [b, n, out]."""
    return ((x @ x.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))


def _tower_sq(xx, xa, K, g_inst, q, P, ctx) -> torch.Tensor:
    """Per-row squared gradient norm of one item-tower Linear layer (module docstring), or
    of several with the same P and q (their squared norms add, so their inputs' Grams do).

    Grams of the layer's inputs (bias as a constant 1 input): xx [b, n, n] among a row's
    n instances, xa [b, n, L] between those and the history items, K [L, L] among the
    history items. g_inst [b, n, out]: the instances' output gradients; q [L, out]; P "I"
    (adapter input layer), "O" (P = I) or None (attention, P = 0)."""
    delta, y, eta, lam, W, profiles, prof, mu = (ctx[k] for k in (
        "delta", "y", "eta", "lam", "W", "profiles", "prof", "mu"))
    # |sum_i outer(g_ri, x_ri)|^2: the row's own instances
    sq = (xx * (g_inst @ g_inst.transpose(1, 2))).sum((1, 2))
    # 2 lam_r sum_i <outer(g_ri, x_ri), M_r> = 2 lam_r sum_ij w_j <psi_rj, g_ri> <A_j, x_ri>
    pg = eta[:, None] * torch.einsum("bik,jk->bij", g_inst, q)
    if P == "I":
        pg = pg + torch.einsum("bik,jk->bij", y[:, None] * g_inst, mu)
    elif P == "O":
        pg = pg + (delta[:, None] * g_inst).sum(-1, keepdim=True)
    sq = sq + 2 * lam * (W[:, None] * xa * pg).sum((1, 2))
    # lam_r^2 |M_r|^2 = lam_r^2 sum_jj' w_j w_j' K_jj' <psi_rj, psi_rj'>, psi = P delta + eta q:
    # the eta-eta part, then (P "I" / "O") the delta-delta and the two delta-eta parts
    kqq = K * (q @ q.T)
    m2 = torch.zeros_like(lam)
    for k, w in enumerate(profiles):  # Omega = diag(w) K diag(w), never formed
        ew = eta * w
        t = ((ew @ kqq) * ew).sum(1)
        if P == "I":
            om_mu = w[:, None] * (K @ (w[:, None] * mu))
            t = t + y.pow(2) @ (mu * om_mu).sum(0) + 2 * ((y @ (q * om_mu).T) * eta).sum(1)
        elif P == "O":
            kw = K @ w
            t = t + (w @ kw) * delta.pow(2).sum(1) + 2 * ((delta @ q.T) * eta * (w * kw)).sum(1)
        m2 = torch.where(prof == k, t, m2)
    return sq + lam.pow(2) * m2


def _grams(x_inst: torch.Tensor, A: torch.Tensor, K: torch.Tensor | None = None):
    """(xx, xa, K) of inputs x_inst [b, n, in] (a row's instances) and A [L, in] (history)."""
    return (x_inst @ x_inst.transpose(1, 2), torch.einsum("bik,jk->bij", x_inst, A),
            A @ A.T if K is None else K)


def _profiles(a: torch.Tensor, pos: torch.Tensor) -> dict:
    """Attention weight profiles and each row's lam_r, nu_r (module docstring)."""
    a = a.detach()
    w0 = torch.exp(a - a.max())
    keep = torch.arange(len(a))[None] != pos[:, None]
    z = (w0[None] * keep).sum(1)
    alone = z < 0.5  # only a row leaving out the argmax can lose more than half its weight
    lam = torch.where(alone, 0.0, 1.0 / z.clamp_min(0.5))
    nu = lam * w0[pos]
    profiles, prof = [w0], torch.zeros(len(pos), dtype=torch.long)
    if alone.any():
        top = int(a.argmax())
        assert bool((pos[alone] == top).all())
        rest = a.clone()
        rest[top] = -torch.inf
        w1 = torch.exp(rest - rest.max()) if len(a) > 1 else torch.zeros_like(a)
        z1 = w1.sum()
        profiles.append(w1)
        prof[alone] = 1
        lam = torch.where(alone, 1.0 / z1 if z1 > 0 else 0.0, lam)  # 0: an empty pool
        nu = torch.where(alone, 0.0, nu)
    W = torch.stack(profiles)[prof]
    # alpha_rj = lam_r W_rj for j != p_r (profile 1 already has 0 at its left-out item)
    return {"profiles": profiles, "prof": prof, "lam": lam, "nu": nu, "W": W,
            "alpha": lam[:, None] * W * keep}


def pooled_clipped_sum(model, local, E, hist: Histories, rows: np.ndarray, negs: np.ndarray,
                       loss: str, max_grad_norm: float, cache: dict | None = None):
    """pooled_path_ok models: ({name: sum of clipped per-row gradients}, that sum for the
    user-local vector [d] (or None), per-row norms [b]); each row's gradient is the exact
    one through its leave-one-out pool of the whole history. cache: a dict kept across
    steps (the Gram of the history's item text is computed once per history tensor)."""
    b, L = len(rows), len(hist.items)
    pos = torch.from_numpy(rows)
    cand = torch.from_numpy(np.concatenate([hist.items.numpy()[rows, None], negs], axis=1))
    c = cand.shape[1]
    ad, ua, att = model.item_adapter, model.user_adapter, model.attention

    def tower(x):  # the item adapter with its intermediate outputs
        z1 = ad.mlp[0](x)
        d1 = ad.mlp[2](ad.mlp[1](z1))
        return z1, d1, ad.mlp[3](d1) + ad.skip(x)

    # Candidates and history run separately: the first backward pass then stops at the
    # pool instead of running over the history (whose per-row parts are the closed form).
    xC, xH = E[cand.reshape(-1)], E[hist.items]
    z1C, d1C, hC = tower(xC)
    z1H, d1H, hH = tower(xH)
    if att is not None:
        t = att[0](hH)
        tt = att[1](t)
        a = att[2](tt).squeeze(-1)
    else:
        a = torch.zeros(L)
    bias = model.item_bias(xC)
    u = pool_leave_one_out(hH, a, pos)
    zu = ua.mlp[0](u)
    du = ua.mlp[2](ua.mlp[1](zu))
    hu = ua.mlp[3](du) + ua.skip(u)
    loc = None if local is None else local.detach().reshape(1, -1).repeat(b, 1).requires_grad_()
    if loc is not None:
        hu = hu + loc
    losses = row_losses(torch.einsum("bd,bcd->bc", hu, hC.view(b, c, -1)) + bias.view(b, c), loss)
    mu = torch.autograd.grad(d1H.sum(), z1H, retain_graph=True)[0]  # elementwise: the diagonal
    if att is not None:
        v, tau = torch.autograd.grad(a.sum(), [hH, t], retain_graph=True)
    else:
        v = torch.zeros_like(hH)
    # one backward pass that stops at the pool: the candidates' and the user side's output
    # gradients and delta_r = dL_r/du_r
    gz1C, ghC, delta, gzu, ghu, gbias = torch.autograd.grad(
        losses.sum(), [z1C, hC, u, zu, hu, bias])
    with torch.no_grad():
        ctx = _profiles(a, pos)
        W2 = ad.mlp[3].weight
        kappa = (delta * u).sum(1)
        eta = delta @ hH.T - kappa[:, None]
        ctx.update(delta=delta, y=delta @ W2, eta=eta, mu=mu)
        e_out = eta.gather(1, pos[:, None])  # eta at the left-out item [b, 1]
        nu = ctx["nu"][:, None]

        def left_out(P, q):  # the left-out instance's output gradient -nu psi_{r,p_r}
            psi = e_out * q[pos]
            if P == "I":
                psi = psi + mu[pos] * ctx["y"]
            elif P == "O":
                psi = psi + delta
            return (-nu * psi)[:, None]

        def inst(xc, xh):  # [b, c + 1, in]: the candidates, then the left-out history item
            return torch.cat([xc.view(b, c, -1), xh[pos][:, None]], 1)

        # Grams of the tower's inputs: item text x (K_x fixed for a device's history, so
        # cached across steps), the adapter's hidden activations d1, and the bias' constant 1
        cached = None if cache is None else cache.get("K_x")
        gx = _grams(xC.view(b, c, -1), xH, cached[1] if cached and cached[0] is hist.items else None)
        if cache is not None:
            cache["K_x"] = (hist.items, gx[2])
        q_in = mu * (v @ W2)
        # the adapter's first layer reads the text alone, and the left-out item's text is the
        # positive candidate's: one instance with both output gradients
        g_in = gz1C.view(b, c, -1).clone()
        g_in[:, 0] += left_out("I", q_in)[:, 0]
        sq = _tower_sq(*(t + 1 for t in gx), g_in, q_in, "I", ctx)
        # the adapter's output layer and its skip share P = I and q = v: one Gram sum over
        # c + 1 instances (the hidden activations differ between the two passes)
        again = torch.tensor([*range(c), 0])
        gx = (gx[0][:, again][:, :, again], gx[1][:, again], gx[2])
        gd = _grams(inst(d1C, d1H), d1H)
        sq = sq + _tower_sq(*(s + t + 1 for s, t in zip(gx, gd)),
                            torch.cat([ghC.view(b, c, -1), left_out("O", v)], 1), v, "O", ctx)
        if att is not None:
            for A, q in ((_ones(hH), tau), (_ones(tt), torch.ones(L, 1))):
                sq = sq + _tower_sq(*_grams(A[pos][:, None], A), left_out(None, q), q, None, ctx)
        # the layers a row uses alone: the item bias on its candidates, the user adapter
        sq = sq + instance_sq(_ones(xC).view(b, c, -1), gbias.view(b, c, 1))
        u1 = _ones(u)
        sq = sq + u1.pow(2).sum(1) * gzu.pow(2).sum(1)
        sq = sq + (du.pow(2).sum(1) + u.pow(2).sum(1) + (0 if loc is None else 1)) * ghu.pow(2).sum(1)
        norms = sq.clamp_min(0).sqrt()
        scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    saved = {"c": c, "alpha": ctx["alpha"], "eta": eta, "delta": delta, "mu": mu, "v": v,
             "tau": tau if att is not None else None, "xC": xC, "xH": xH, "d1C": d1C,
             "d1H": d1H, "hH": hH, "tt": tt if att is not None else None, "u": u, "du": du,
             "gz1C": gz1C, "ghC": ghC, "gbias": gbias, "gzu": gzu, "ghu": ghu}
    return _clipped_sums(model, scale, saved), (None if loc is None else scale @ ghu), norms


def _clipped_sums(model, s: torch.Tensor, v: dict) -> dict:
    """sum_r s_r (row r's gradient) for every federated parameter, from what the norms
    already used (book-keeping, Bu et al. 2023): each layer's weight gradient is
    (output gradients)^T (inputs) over the candidates (their gradients scaled by their
    row's s_r) and the history items (output gradient sum_r s_r alpha_rj psi_rj, with
    alpha the rows' exact leave-one-out attention weights); no second backward pass."""
    c = v["c"]
    ad, att = model.item_adapter, model.attention
    cs = s[:, None] * v["alpha"]
    beta = (cs * v["eta"]).sum(0)  # [L]: sum_r s_r dL_r/da_j
    g_out = cs.T @ v["delta"] + beta[:, None] * v["v"]  # [L, d] at the adapter's output
    g_in = v["mu"] * (g_out @ ad.mlp[3].weight)  # [L, hidden] at its first layer
    sc = s.repeat_interleave(c)[:, None]  # candidate rows' scale
    xC, xH, d1C, d1H = v["xC"], v["xH"], v["d1C"].detach(), v["d1H"].detach()
    gz1, gh = v["gz1C"] * sc, v["ghC"] * sc
    out = {"item_adapter.mlp.0.weight": gz1.T @ xC + g_in.T @ xH,
           "item_adapter.mlp.0.bias": gz1.sum(0) + g_in.sum(0),
           "item_adapter.mlp.3.weight": gh.T @ d1C + g_out.T @ d1H,
           "item_adapter.mlp.3.bias": gh.sum(0) + g_out.sum(0),
           "item_adapter.skip.weight": gh.T @ xC + g_out.T @ xH}
    gb = v["gbias"] * sc
    out.update({"item_bias.weight": gb.T @ xC, "item_bias.bias": gb.sum(0)})
    if att is not None:
        g_t = beta[:, None] * v["tau"]
        out.update({"attention.0.weight": g_t.T @ v["hH"].detach(), "attention.0.bias": g_t.sum(0),
                    "attention.2.weight": beta[None] @ v["tt"].detach(),
                    "attention.2.bias": beta.sum(0, keepdim=True)})
    u, du = v["u"].detach(), v["du"].detach()
    gzu, ghu = v["gzu"] * s[:, None], v["ghu"] * s[:, None]
    out.update({"user_adapter.mlp.0.weight": gzu.T @ u, "user_adapter.mlp.0.bias": gzu.sum(0),
                "user_adapter.mlp.3.weight": ghu.T @ du, "user_adapter.skip.weight": ghu.T @ u})
    names = [n for n, _ in model.named_parameters()]
    assert sorted(out) == sorted(names), "pooled_clipped_sum: the model's layers changed"
    return {n: out[n] for n in names}
