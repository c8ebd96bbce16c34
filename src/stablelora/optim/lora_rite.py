"""LoRA-RITE (Yen et al., "LoRA Done RITE", arXiv 2410.20625): transformation-invariant preconditioning.

PEFT is not shipping it, so it is written here from the paper's update. In the paper's notation Z = A B^T with
A (m x r), B (n x r); in PEFT's, delta W = B_peft @ A_peft, so paper-A = B_peft and paper-B = A_peft^T. For the
factor being updated (X) with partner Y = U_Y R_Y (QR):

    g_bar  = grad_X  R_Y^{-1}                          magnitude-free gradient
    P      = U_Y^T U_Y,prev                            transports the state when the basis rotates
    V      = beta2 P V_prev P^T + (1 - beta2) g_bar^T g_bar
    rho    = beta2 (rho_prev + d(V_prev, P V_prev P^T))   mass lost by the projection (largest eigenvalue gap)
    S      = g_bar (V_hat + rho_hat I + eps I)^{-1/2}
    M      = beta1 M_prev P^T + (1 - beta1) S
    X     <- X - lr M_hat R_Y^{-T}                     (hats: Adam bias correction)

All r x r algebra runs in float64 (it is tiny). A partner that is exactly zero (B at PEFT's init) gives a zero
gradient for X, handled with a pseudo-inverse. Parameters that are not LoRA factors get a plain AdamW update.
Decoupled weight decay applies to every parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from stablelora.optim.pairs import LoraPair


def _largest_eigen_gap(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    ev_before = torch.linalg.eigvalsh(before)
    ev_after = torch.linalg.eigvalsh(after)
    return (ev_before - ev_after).abs().max()


def _inverse_sqrt(mat: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(mat)
    return vectors @ torch.diag(values.clamp_min(1e-30).rsqrt()) @ vectors.T


class LoRARITE(Optimizer):
    """LoRA-RITE over ``lora_pairs``; every other parameter in ``params`` is updated by AdamW."""

    def __init__(self, params: Any, lora_pairs: list[LoraPair], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0:
            raise ValueError(f"LoRA-RITE: invalid lr/betas/eps ({lr}, {betas}, {eps}).")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._pairs = lora_pairs
        self._paired = {id(p) for pair in lora_pairs for p in (pair.lora_A, pair.lora_B)}
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self._step = 0

    @staticmethod
    def _basis(partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, r = torch.linalg.qr(partner)
        return q, r

    def _factor_update(self, x: torch.Tensor, grad: torch.Tensor, partner: torch.Tensor, step: int) -> torch.Tensor:
        """The update direction for X (rows x r) given its partner (cols x r), both in paper orientation."""
        group = self._group_of[id(x)]
        beta1, beta2 = group["betas"]
        state = self.state[x]
        basis, r = self._basis(partner.double())
        r_pinv = torch.linalg.pinv(r)
        g_bar = grad.double() @ r_pinv
        rank = r.shape[0]
        if "V" not in state:
            state["V"] = torch.zeros(rank, rank, dtype=torch.float64, device=x.device)
            state["M"] = torch.zeros_like(g_bar)
            state["rho"] = torch.zeros((), dtype=torch.float64, device=x.device)
            state["basis"] = basis
        transport = basis.T @ state["basis"]
        moved = transport @ state["V"] @ transport.T
        state["rho"] = beta2 * (state["rho"] + _largest_eigen_gap(state["V"], moved))
        state["V"] = beta2 * moved + (1 - beta2) * g_bar.T @ g_bar
        state["basis"] = basis
        v_hat = state["V"] / (1 - beta2**step)
        rho_hat = state["rho"] / (1 - beta2**step)
        eye = torch.eye(rank, dtype=torch.float64, device=x.device)
        s = g_bar @ _inverse_sqrt(v_hat + (rho_hat + group["eps"]) * eye)
        state["M"] = beta1 * state["M"] @ transport.T + (1 - beta1) * s
        m_hat = state["M"] / (1 - beta1**step)
        return m_hat @ r_pinv.T

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = {id(p) for g in self.param_groups for p in g["params"]}
        if not self._paired <= live:
            raise RuntimeError(
                "LoRA-RITE: the LoRA factors it was built with are no longer the optimizer's parameters; something "
                "replaced them after it was built (Accelerate's FSDP2 swaps them for shards). LoRA-RITE needs whole "
                "A and B matrices: train it unsharded (one process or DDP), or use stable-lora / adamw under FSDP2.")
        self._step += 1
        updates = {}
        for pair in self._pairs:
            a, b = pair.lora_A, pair.lora_B  # PEFT: A (r x in), B (out x r); paper-A = B, paper-B = A^T
            if a.grad is None or b.grad is None:
                continue
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            updates[id(b)] = self._factor_update(b, b.grad.reshape(b2.shape), a2.T, self._step).reshape(b.shape)
            updates[id(a)] = self._factor_update(a, a.grad.reshape(a2.shape).T, b2, self._step).T.reshape(a.shape)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - lr * wd)
                if id(p) in self._paired:
                    if id(p) in updates:
                        p.add_(updates[id(p)].to(p.dtype), alpha=-lr)
                    continue
                self._adamw(p, group)
        return loss

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["lora_rite_step"] = self._step
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._step = state_dict.get("lora_rite_step", 0)
        # float64 preconditioner state must not be cast to the parameter dtype: restore it after the base load
        saved = {k: {n: v for n, v in s.items() if torch.is_tensor(v) and v.dtype == torch.float64}
                 for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for idx, p in zip(ids, params):
            for name, value in saved.get(idx, {}).items():
                self.state[p][name] = value.to(p.device)
