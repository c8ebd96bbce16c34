"""``stablelora theory``: does the width-scaling behaviour behind Stable-LoRA show up in a real LoRA layer?

Set-up (paper.md §1): a LoRA layer Y = s B A X with A (r x n), B (n x r), inputs with Theta(1) entries, trained
by Adam on a fixed regression target, at widths n in ``widths``. Hyper-parameters follow the paper's condition
gamma[s] + 2 gamma[eta] + 1 = 0 in the small-learning-rate regime it is about: eta = eta0 (n/n0)^-1.5 and
s = s0 (n/n0)^2 (gamma[eta] = -1.5, gamma[s] = 2). Theorem 3.1's initialisation condition then needs
gamma[A0 X] <= gamma[eta] + 1 = -0.5, which
  (a) standard init (A Kaiming-uniform, B = 0) violates: gamma[A0 X] = 0, so the A-path update delta1 = s dB A X
      is predicted to grow like n^0.5 while the B-path delta2 = s B dA X stays Theta(1);
  (b) Stable-LoRA repairs by shrinking A until ||A||/n <= ||B||/n: both predicted Theta(1) once layers stop;
  (c) a reference with A0 scaled by (n/n0)^-1 (close to the ideal A0 = B0 = 0) satisfies: both Theta(1).
For each variant and width the command measures the RMS of delta1, delta2 and the whole output update dY on a
probe batch, averaged over the last ``tail`` steps, fits the exponent gamma of each against n on a log-log
scale, and compares it with the prediction. The verdict is printed either way: a disagreement is a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTED = {  # exponent of RMS(delta1), RMS(delta2) in n
    "standard": (0.5, 0.0),
    "stable-lora": (0.0, 0.0),
    "small-A reference": (0.0, 0.0),
}


@dataclass
class WidthResult:
    """RMS of delta1, delta2 and dY averaged over the early window (steps 2..tail+1) and the last ``tail`` steps."""

    variant: str
    width: int
    early: tuple[float, float, float]
    late: tuple[float, float, float]
    stopped_at: int | None


def _run(variant: str, n: int, *, n0: int, rank: int, steps: int, tail: int, eta0: float, s0: float,
         shrink_ratio: float, batch: int, seed: int) -> WidthResult:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, generator=g)
    target = torch.tanh(x @ torch.randn(n, n, generator=g) / math.sqrt(n))
    a = torch.empty(rank, n)
    bound = 1.0 / math.sqrt(n)  # Kaiming-uniform(a=sqrt(5)) bound for fan-in n, as PEFT
    a.uniform_(-bound, bound, generator=g)
    if variant == "small-A reference":
        a /= n / n0
    b = torch.zeros(n, rank)
    a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
    eta, s = eta0 * (n / n0) ** -1.5, s0 * (n / n0) ** 2
    opt = torch.optim.Adam([a, b], lr=eta)
    shrinking, stopped_at = variant == "stable-lora", None
    per_step = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = (s * (x @ a.T) @ b.T - target).pow(2).mean()
        loss.backward()
        a0, b0 = a.detach().clone(), b.detach().clone()
        with torch.no_grad():
            if shrinking:
                if a.norm() < b.norm():  # ||A||/n vs ||B||/n with in = out = n
                    shrinking, stopped_at = False, t
                else:
                    a.mul_(1 - shrink_ratio)
        opt.step()  # dA below includes this step's shrink: it is part of how A changed
        with torch.no_grad():
            da, db = a.detach() - a0, b.detach() - b0
            y0 = s * (x @ a0.T) @ b0.T
            y1 = s * (x @ a.detach().T) @ b.detach().T
            per_step.append(((s * (x @ a0.T) @ db.T).pow(2).mean().sqrt().item(),
                             (s * (x @ da.T) @ b0.T).pow(2).mean().sqrt().item(),
                             (y1 - y0).pow(2).mean().sqrt().item()))

    def window(rows):
        return tuple(sum(r[k] for r in rows) / len(rows) for k in range(3))

    # step 1 has B = 0, so delta2 = 0: the early window starts at step 2
    return WidthResult(variant, n, window(per_step[1 : 1 + tail]), window(per_step[-tail:]), stopped_at)


def fit_exponent(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    xs, ys = [math.log(w) for w in widths], [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run_theory(widths=(128, 256, 512, 1024, 2048, 4096), *, rank: int = 4, steps: int = 300, tail: int = 50,
               eta0: float = 2e-3, s0: float = 1.0, shrink_ratio: float = 0.05, batch: int = 64, seed: int = 0,
               tolerance: float = 0.2, progress: bool = True):
    """Run every variant at every width; returns (results, fits, verdict lines)."""
    from tqdm.auto import tqdm

    widths = list(widths)
    jobs = [(v, n) for v in PREDICTED for n in widths]
    results = [
        _run(v, n, n0=widths[0], rank=rank, steps=steps, tail=tail, eta0=eta0, s0=s0, shrink_ratio=shrink_ratio,
             batch=batch, seed=seed)
        for v, n in tqdm(jobs, desc="width-scaling runs", disable=not progress)
    ]
    fits, verdicts = {}, []
    for phase in ("early", "late"):
        for variant, (p1, p2) in PREDICTED.items():
            rows = [getattr(r, phase) for r in results if r.variant == variant]
            g1, g2, gy = (fit_exponent(widths, [row[k] for row in rows]) for k in range(3))
            fits[(phase, variant)] = (g1, g2, gy)
            ok = abs(g1 - p1) <= tolerance and abs(g2 - p2) <= tolerance
            balance_ok = abs((g1 - g2) - (p1 - p2)) <= tolerance
            verdicts.append(f"{phase} steps, {variant}: gamma[delta1/delta2] = {g1 - g2:+.2f} (predicted "
                            f"{p1 - p2:+.1f}): the balance {'AGREES' if balance_ok else 'DISAGREES'}; gamma[delta1] = "
                            f"{g1:+.2f} (predicted {p1:+.1f}), gamma[delta2] = {g2:+.2f} (predicted {p2:+.1f}), "
                            f"gamma[dY] = {gy:+.2f} -> the exponents {'AGREE' if ok else 'DISAGREE'} with the "
                            f"prediction (tolerance {tolerance}).")
    return results, fits, verdicts


def format_table(results: list[WidthResult]) -> str:
    lines = ["| variant | n | early delta1 | early delta2 | early delta1/delta2 | late delta1 | late delta2 | "
             "late delta1/delta2 | stopped at step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        (e1, e2, _), (l1, l2, _) = r.early, r.late
        lines.append(f"| {r.variant} | {r.width} | {e1:.3e} | {e2:.3e} | {e1 / e2:.3g} | {l1:.3e} | {l2:.3e} | "
                     f"{l1 / l2:.3g} | {r.stopped_at if r.stopped_at else '-'} |")
    return "\n".join(lines)


def plot(results: list[WidthResult], fits: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    titles = ("A-path δ1 = s·ΔB·A·x", "B-path δ2 = s·B·ΔA·x", "whole update ΔY")
    for row, phase in enumerate(("early", "late")):
        for k, title in enumerate(titles):
            ax = axes[row][k]
            for i, variant in enumerate(PREDICTED):
                rows = [r for r in results if r.variant == variant]
                ax.loglog([r.width for r in rows], [getattr(r, phase)[k] for r in rows], "o-",
                          color=plt.cm.tab10(i), label=f"{variant} (γ = {fits[(phase, variant)][k]:+.2f})")
            widths = sorted({r.width for r in results})
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{title} ({phase} steps)")
            ax.set_xlabel("width n")
            ax.set_ylabel("RMS per output entry")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
