"""A learned, differentiable N:M choice against ebft-mask's saliency schedule, on the same SmolLM2 blocks as
bench/mask_blocks.py (2:4, Wanda's masks, 2 epochs): the variant docs/methods/ebft-mask.md#what-was-tried reports.

Each group of M inputs of a row chooses among its C(M, N) candidate patterns through logits (MaskLLM's
parametrisation, Fang et al. 2024): the pruner's candidate starts ``--prior`` above the others, the forward pass
uses the arg-max candidate (exact N:M at every step), and after each optimiser step the logits move against
the straight-through Gumbel-softmax gradient ``p_c (s_c - sum_c' p_c' s_c') / tau``, where
``s_c = sum_j P_cj G_j V_j`` is the first-order loss change of candidate c (G the step's gradient at the weights
the block used, V the weight a position holds when kept: its trained value, or its latent one), normalised by
its root mean square over the layer and scaled by ``--logit-lr``; tau anneals from 4 to 0.05 over the mask's
75% of the steps, then the mask freezes as in ebft-mask.

    python bench/mask_nm_choice.py [--logit-lr 0.03] [--prior 3] [--blocks 2,12,24]

Last line: the median over blocks of (learned-choice block MSE / fixed-mask block MSE), below 1 when it pays.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mask_blocks import main  # noqa: E402

from ebft_engine.finetune.masks import SETTLE, MaskLearner  # noqa: E402

TAU = (4.0, 0.05)  # MaskLLM's temperature schedule


class GumbelChoice(MaskLearner):
    """ebft-mask's learner with the N:M mask chosen by learned candidate logits (the module's text)."""

    def __init__(self, base: MaskLearner, seed: int, logit_lr: float, prior: float):
        super().__init__(base.layers, base.nm, base.settle, base.swap)
        n, m = self.nm
        self.cands = torch.tensor([[float(j in c) for j in range(m)] for c in itertools.combinations(range(m), n)])
        self.generator, self.logit_lr = torch.Generator().manual_seed(seed), logit_lr
        self.logits, self.grads, self.hooks = {}, {}, []
        for k, layer in enumerate(self.layers):
            rows, cols = layer.mask.shape
            chosen = layer.mask.float().reshape(rows, cols // m, m) @ self.cands.T == n  # (rows, G, C)
            self.logits[k] = prior * chosen.float()
            layer.linear.weight.requires_grad_(True)  # the trainer sets it too; the hook needs it now
            self.hooks.append(layer.linear.weight.register_hook(
                lambda g, k=k: self.grads.__setitem__(k, g.detach().float())))

    def after_step(self, step: int, total_steps: int) -> float:
        settle_step = math.ceil(self.settle * total_steps)
        if self.frozen or step >= settle_step:
            self.frozen = True
            return 0.0
        tau = TAU[0] * (TAU[1] / TAU[0]) ** (step / settle_step)
        with torch.no_grad():
            flipped = sum(self._choose(k, layer, tau) for k, layer in enumerate(self.layers) if k in self.grads)
        return flipped / max(self.total, 1)

    def _choose(self, k: int, layer, tau: float) -> int:
        weight, m = layer.linear.weight, self.nm[1]
        rows, cols = weight.shape
        values = torch.where(layer.mask, weight.float(), layer.latent)
        s = (self.grads[k] * values).reshape(rows, cols // m, m) @ self.cands.T  # (rows, G, C)
        gumbel = -torch.log(-torch.log(torch.rand(s.shape, generator=self.generator).clamp_(1e-20, 1)))
        p = torch.softmax((self.logits[k] + gumbel) / tau, dim=-1)
        g = p * (s - (p * s).sum(-1, keepdim=True)) / tau
        self.logits[k] -= self.logit_lr * g / g.pow(2).mean().sqrt().clamp_min(1e-30)
        new = self.cands[self.logits[k].argmax(-1)].reshape(rows, cols).bool()
        enter, leave = new & ~layer.mask, layer.mask & ~new
        weight[enter] = values[enter].to(weight.dtype)  # as ebft-mask: an entering weight takes its latent value
        layer.latent[enter] = 0
        layer.latent[leave] = weight[leave].float()
        weight[leave] = 0
        layer.mask.copy_(new)
        return int(enter.sum() + leave.sum())

    def finish(self, rolled_back: bool):
        for hook in self.hooks:
            hook.remove()
        return super().finish(rolled_back)


def gumbel_learner(linears, masks, saliency, nm, dense, seed, args) -> MaskLearner:
    """The learned choice for N:M; unstructured settings keep ebft-mask's schedule."""
    base = MaskLearner.for_block(linears, masks, saliency, nm, settle=SETTLE, dense=dense)
    return base if nm is None else GumbelChoice(base, seed, args.logit_lr, args.prior)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logit-lr", type=float, default=0.03, help="step of the normalised logit gradient")
    parser.add_argument("--prior", type=float, default=3.0, help="the pruner's candidate's head start (logits)")
    parser.set_defaults(settings="2:4")
    main(gumbel_learner, parser)
