"""Learned masks against fixed masks, one SmolLM2 block at a time: each block's real inputs (the dense model's
stream over the cached self-calibration set), Wanda's masks (or SparseGPT's, with its weight update), EBFT with the demo preset's settings (2 epochs,
lr 3e-3, batch 8), and the block's final reconstruction MSE on its calibration data for fixed-mask EBFT and for
ebft-mask's schedule (ebft_engine/finetune/masks.py).

    python bench/mask_blocks.py [--blocks 2,12,24] [--epochs 2] [--settings 2:4,70%] [--prior sparsegpt]

Reads the demo preset's self-calibration from the cache (or generates it, slowly). Last line: the median over blocks and
settings of (learned-mask MSE / fixed-mask MSE), below 1 when learning the masks pays on the block's own loss;
the line before it, the median ratio of their training times (the two run one after the other, A B per case).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebft_engine.config import EbftConfig, RunConfig  # noqa: E402
from ebft_engine.data import self_generated  # noqa: E402
from ebft_engine.device import Precision  # noqa: E402
from ebft_engine.finetune import batch_mse, finetune_block  # noqa: E402
from ebft_engine.finetune.masks import MaskLearner  # noqa: E402
from ebft_engine.models import adapter_for  # noqa: E402
from ebft_engine.models.loading import load_model, resolve_source  # noqa: E402
from ebft_engine.sparsity import get_method  # noqa: E402
from ebft_engine.sparsity.registry import LayerStats  # noqa: E402

CPU = torch.device("cpu")
SETTINGS = (((2, 4), 0.5), (None, 0.7))


def drive(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def schedule_learner(linears, masks, saliency, nm, dense, seed, args) -> MaskLearner:
    """ebft-mask's own learner (the seed and the script's arguments are for variants' learners)."""
    return MaskLearner.for_block(linears, masks, saliency, nm, dense=dense)


def main(learner_for=schedule_learner, ap: argparse.ArgumentParser | None = None) -> None:
    """Run the comparison; ``learner_for`` builds a block's learner (``schedule_learner``'s arguments), so a
    variant's script can compare its own (bench/mask_nm_choice.py)."""
    ap = ap or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,12,24")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--settings", default="2:4,70%", help="which of 2:4 and 70%% to run")
    ap.add_argument("--prior", default="wanda", choices=("wanda", "sparsegpt"), help="the pruner whose masks start")
    args = ap.parse_args()
    blocks_wanted = [int(b) for b in args.blocks.split(",")]
    preset = RunConfig.from_yaml("assets/presets/smollm2-demo.yaml")
    model, tokenizer = load_model(resolve_source("smollm2-135m"), torch.float32)
    adapter = adapter_for(model)
    precision = Precision(CPU, torch.float32, torch.bfloat16)
    ids = self_generated(model, tokenizer, preset.calib.nsamples, preset.calib.seqlen, preset.seed, precision)
    kwargs = adapter.block_kwargs(ids.shape[1], CPU, torch.float32)
    call = lambda b, x: adapter.call_block(b, x, kwargs)  # noqa: E731
    cfg = EbftConfig(epochs=args.epochs, lr=preset.ebft.lr, batch_size=preset.ebft.batch_size, weight_decay=0.1)
    ratios, time_ratios = [], []
    with torch.no_grad():
        x = adapter.embed(ids)
    for i, dense in enumerate(adapter.blocks):
        if i > max(blocks_wanted):
            break
        sq, xtx = {}, {}

        def collect(name, a):
            rows = a.reshape(-1, a.shape[-1]).float()
            sq[name] = sq.get(name, 0) + (rows ** 2).sum(0)
            xtx[name] = xtx.get(name, 0) + rows.T @ rows

        hooks = [layer.register_forward_pre_hook(lambda _m, a, n=name: collect(n, a[0]))
                 for name, layer in adapter.linears(dense).items()]
        with torch.no_grad():
            targets = torch.cat([call(dense, x[j:j + 8]) for j in range(0, x.shape[0], 8)])
        for h in hooks:
            h.remove()
        if i in blocks_wanted:
            for nm, sparsity in [st for st in SETTINGS if ('2:4' if st[0] else f'{st[1]:.0%}') in args.settings]:
                losses, seconds = {}, {}
                for learned in (False, True):
                    block, masks = copy.deepcopy(dense), {}
                    for name, linear in adapter.linears(block).items():
                        stats = LayerStats(input_norms=sq[name] / ids.shape[0],
                                           hessian=2 * xtx[name] / ids.shape[0])
                        result = get_method(args.prior).fn(linear.weight.data, stats, sparsity, nm)
                        with torch.no_grad():
                            linear.weight.mul_(result.mask)
                            if result.weight is not None:
                                linear.weight.copy_(result.weight)
                        masks[linear.weight] = result.mask
                    t = time.perf_counter()
                    if learned:
                        dense_w = {n: l.weight.detach().clone() for n, l in adapter.linears(dense).items()}
                        saliency = {n: v.sqrt() for n, v in sq.items()}
                        learner = learner_for(adapter.linears(block), masks, saliency, nm, dense_w, i, args)
                        drive(finetune_block(block, call, x, targets, learner.grad_masks, cfg, precision,
                                             label="ebft-mask", index=i, seed=i, after_step=learner.after_step))
                        learner.finish(False)
                    else:
                        drive(finetune_block(block, call, x, targets, masks, cfg, precision, label="ebft", index=i,
                                             seed=i))
                    seconds[learned] = time.perf_counter() - t
                    losses[learned] = batch_mse(block, call, x, targets, precision, 8)
                ratios.append(losses[True] / losses[False])
                time_ratios.append(seconds[True] / seconds[False])
                print(f"block {i:>2} {'2:4' if nm else f'{sparsity:.0%}'}: fixed {losses[False]:.4g} "
                      f"({seconds[False]:.1f} s), learned {losses[True]:.4g} ({seconds[True]:.1f} s), "
                      f"ratio {ratios[-1]:.3f}", flush=True)
        with torch.no_grad():
            x = targets  # the dense stream feeds the next block
    print(f"mask_time_ratio: {statistics.median(time_ratios):.2f}x (learned / fixed seconds per block, median)")
    print(f"mask_block_loss_ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
