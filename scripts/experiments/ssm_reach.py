#!/usr/bin/env python
"""How far back a freshly initialised S4 SSM looks: the share of each filter's weight (L1 mass of the convolution
kernel K, per channel, averaged over channels) that lies beyond a given lag, for ranges of initial step sizes.

A mode decays as exp(-dt t / 2) (S4D-Lin: Re A = -1/2), so its time scale is about 2 / dt tokens; the step sizes are
drawn log-uniform in [ssm_dt_min, ssm_dt_max]. An upcycled BST with previous-block attention already sees the last
W to 2W tokens, so what its SSM adds can only come from the kernel's mass beyond about 2W.

    python scripts/experiments/ssm_reach.py --dt_ranges 0.01:1,5e-4:8e-3,1.2e-4:2e-3 --lags 512,2048
"""

import argparse
import json

import torch

from modeling_bst import BSTConfig
from modeling_bst.modeling_bst import BSTS4DKernel


def kernel_share_beyond(dt_min: float, dt_max: float, lags: list[int], channels: int = 576, state_size: int = 64,
                        length: int = 16384, seed: int = 0) -> dict[int, float]:
    """{lag: mean over channels of sum_{l >= lag} |K[l]| / sum_l |K[l]|} for S4D kernels initialised as a BST's are
    (C random: the share depends on it a little, hence the fixed seed), truncated at `length`."""
    torch.manual_seed(seed)
    # The kernel reads only the state size and the step sizes from the config; its width is `channels`.
    config = BSTConfig(ssm_state_size=state_size, ssm_dt_min=dt_min, ssm_dt_max=dt_max)
    kernel = BSTS4DKernel(config, channels)
    kernel.reset_parameters()
    with torch.no_grad():
        magnitude = kernel(length).abs().double()  # (channels, length)
    total = magnitude.sum(-1)
    return {lag: (magnitude[:, lag:].sum(-1) / total).mean().item() for lag in lags}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dt_ranges", default="0.01:1,5e-4:8e-3,1.2e-4:2e-3", help="min:max step-size ranges")
    parser.add_argument("--lags", default="256,512,1024,2048,4096")
    parser.add_argument("--channels", type=int, default=576, help="SmolLM2-135M's width")
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args(argv)
    lags = [int(lag) for lag in args.lags.split(",")]
    rows = []
    for dt_range in args.dt_ranges.split(","):
        dt_min, dt_max = (float(value) for value in dt_range.split(":"))
        share = kernel_share_beyond(dt_min, dt_max, lags, channels=args.channels, length=args.length)
        rows.append({"dt_min": dt_min, "dt_max": dt_max, "share_beyond": share})
    print("| step sizes (time scales ~2/dt) | " + " | ".join(f"beyond {lag:,}" for lag in lags) + " |")
    print("|---|" + "---|" * len(lags))
    for row in rows:
        scales = f"[{row['dt_min']:g}, {row['dt_max']:g}] ({2 / row['dt_max']:,.0f}-{2 / row['dt_min']:,.0f} tokens)"
        print(f"| {scales} | " + " | ".join(f"{row['share_beyond'][lag]:.1%}" for lag in lags) + " |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
