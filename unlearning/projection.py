"""Task subspaces of the shared layers and the task-aware projection of design §2.3.

For each shared convolution ``l`` and task ``k`` we estimate the subspace of
out-channel directions that task ``k`` uses on the model's training data: the
span of the layer-output gradients ``∂ℓ_k/∂z_l`` (one ``C_out`` vector per
sample and pixel), kept up to an energy fraction ``ε`` of their Gram matrix.
A conv weight's gradient ``Σ_p g_p x_pᵀ`` has its rows' column space inside
that span, so restricting an update to ``Q Qᵀ G`` over the out-channel
dimension restricts which output directions of the layer it can move.

Given forget tasks ``F`` and protected tasks ``P``,
``Q = orth((I - Π_P) U^F)`` is the part of the forget tasks' subspace that is
orthogonal to everything the protected tasks use.

The bases depend only on the model version and the data it reflects, not on a
request, so :func:`cached_subspaces` keeps them in the per-version cache dict.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .data.base import MultiTaskDataset
from .losses import cell_losses
from .model import weights_fingerprint


def shared_convs(model) -> dict[str, torch.nn.Conv2d]:
    """The shared (encoder) convolutions by qualified parameter prefix, e.g. ``encoder.stages.0.0.0``."""
    return {f"encoder.{name}": m for name, m in model.encoder.named_modules() if isinstance(m, torch.nn.Conv2d)}


def shared_norms(model) -> dict[str, str]:
    """For every shared GroupNorm, the prefix of the conv whose output channels it scales
    (the conv right before it in the block): its scale and shift are projected with that
    conv's ``Q``. An approximation that does not protect them: the subspaces are of the
    conv's output before the normalisation, which re-centres and rescales each group, so
    the GroupNorm's gradients do not lie in that space (the projected forget gradient of a
    shift kept cosines of up to 0.43 with the protected tasks' gradient)."""
    out = {}
    last_conv = None
    for name, m in model.encoder.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            last_conv = f"encoder.{name}"
        elif isinstance(m, torch.nn.GroupNorm) and last_conv is not None:
            out[f"encoder.{name}"] = last_conv
    return out


def energy_basis(gram: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal columns spanning the top eigen-directions of a PSD ``gram`` that hold
    at least ``energy`` of its trace; (C, 0) when the gram is zero."""
    gram = 0.5 * (gram + gram.T)
    vals, vecs = torch.linalg.eigh(gram.double())
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    total = float(vals.sum())
    if total <= 0.0:
        return torch.zeros(gram.shape[0], 0, dtype=torch.float64)
    cum = torch.cumsum(vals, 0) / total
    rank = int((cum < energy).sum()) + 1
    rank = min(rank, int((vals > total * 1e-10).sum()))
    return vecs[:, :rank].contiguous()


def orth(matrix: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the column space of ``matrix`` (SVD): the singular directions above
    ``rtol`` times the largest singular value, or above ``rtol`` itself when that is below 1."""
    if matrix.numel() == 0 or matrix.shape[1] == 0:
        return torch.zeros(matrix.shape[0], 0, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros(matrix.shape[0], 0, dtype=torch.float64)
    # Relative to the largest singular value but floored at 1, so an absolute floor: the
    # callers' columns have norm at most 1 (orthonormal bases, or one with a protected span
    # projected out), and what projection leaves below rtol of a direction inside that span
    # is numerical noise, even when nothing larger remains to scale it against.
    keep = s > rtol * max(1.0, float(s[0]))
    return u[:, keep].contiguous()


def task_subspaces(
    model,
    dataset: MultiTaskDataset,
    tasks: Iterable[str] | None = None,
    energy: float = 0.95,
    n_samples: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    device=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{conv prefix: {task: U (C_out, r) float64}}`` from the output gradients of up
    to ``n_samples`` seeded random supervised instances per task of ``dataset``.

    Each instance's loss only reaches its own activations (GroupNorm is per
    sample), so the gradient of the summed loss w.r.t. ``z_l`` stacks the
    per-sample gradients; every pixel's ``C_out`` vector is one sample of the
    subspace.
    """
    device = device or next(model.parameters()).device
    tasks = list(dataset.tasks if tasks is None else tasks)
    convs = shared_convs(model)
    grams = {name: {t: torch.zeros(m.out_channels, m.out_channels, dtype=torch.float64) for t in tasks} for name, m in convs.items()}
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    was_training = model.training
    model.eval()
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, inp, out):
            # A frozen copy (no parameter requires grad) still needs a graph from z_l on.
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            outputs[name] = out
            return out

        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in convs.items()]
    try:
        for k, task in enumerate(tasks):
            rows = dataset.available[:, dataset.tasks.index(task)].nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=gen)[:n_samples]]
            for start in range(0, len(rows), batch_size):
                batch = dataset.batch(rows[start : start + batch_size]).to(device)
                outputs.clear()
                loss = cell_losses(model, batch, [task])[task].sum()
                names = list(outputs)
                grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
                for name, g in zip(names, grads):
                    if g is None:
                        continue
                    flat = g.detach().double().transpose(0, 1).reshape(g.shape[1], -1)
                    grams[name][task] += (flat @ flat.T).cpu()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: {t: energy_basis(grams[name][t], energy) for t in tasks} for name in convs}


def forget_projector(subspaces: dict[str, torch.Tensor], forget_tasks: Iterable[str], protected_tasks: Iterable[str]) -> torch.Tensor:
    """``Q = orth((I - Π_P) U^F)`` for one layer: orthonormal columns (C_out, q), float64.

    With no protected task (full-task unlearning) this is ``orth(U^F)``.
    """
    forget_tasks, protected_tasks = list(forget_tasks), list(protected_tasks)
    u_f = torch.cat([subspaces[t] for t in forget_tasks], 1) if forget_tasks else None
    if u_f is None or u_f.shape[1] == 0:
        any_basis = next(iter(subspaces.values()))
        return torch.zeros(any_basis.shape[0], 0, dtype=torch.float64)
    if protected_tasks:
        u_p = orth(torch.cat([subspaces[t] for t in protected_tasks], 1))
        u_f = u_f - u_p @ (u_p.T @ u_f)
    return orth(u_f)


def cached_subspaces(model, dataset: MultiTaskDataset, cache: dict, energy: float, n_samples: int, seed: int = 0, device=None):
    """:func:`task_subspaces` over all of ``dataset``'s tasks, memoised in ``cache`` (the
    caller's per-model-version dict) under a key naming the settings and the cells they are
    computed from (by the dataset's size alone, a dataset with a cell erased since read the
    subspaces that cell's gradients had shaped), and by the weights (another model handed
    the same cache read the first one's)."""
    key = ("task_subspaces", float(energy), int(n_samples), int(seed), dataset.cells_key(), weights_fingerprint(model))
    if key not in cache:
        cache[key] = task_subspaces(model, dataset, energy=energy, n_samples=n_samples, seed=seed, device=device)
    return cache[key]


def project_rows(grad: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Q Qᵀ G`` over the first (out-channel) dimension of a parameter gradient."""
    flat = grad.reshape(grad.shape[0], -1)
    qq = q.to(device=grad.device, dtype=grad.dtype)
    return (qq @ (qq.T @ flat)).reshape(grad.shape)


__all__ = [
    "shared_convs",
    "shared_norms",
    "energy_basis",
    "orth",
    "task_subspaces",
    "forget_projector",
    "cached_subspaces",
    "project_rows",
]
