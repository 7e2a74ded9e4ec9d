#!/usr/bin/env python
"""Eager per-step decoding in bf16 on a GPU, with PyTorch's cuDNN attention backend on or off (BST and Llama).

    python scripts/sdpa_decode_probe.py on      # the default backends
    python scripts/sdpa_decode_probe.py off     # torch.backends.cuda.enable_cudnn_sdp(False)

The benchmark's shapes (d 512, 4 layers), a 511-token prefill, then 30 greedy steps, one forward call each, under
bf16 autocast; prints the median step time and the first six. It shows why a decoding step whose key length changes
every step is slow there: cuDNN's backend plans each new key length anew (see `step_reads_all_slots` in the model).
"""

import statistics
import sys
import time
from pathlib import Path

import torch


SCRIPTS_DIR = Path(__file__).resolve().parent
for path in (SCRIPTS_DIR.parent, SCRIPTS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bst_benchmark.baselines import build_causal_lms  # noqa: E402
from bst_benchmark.settings import parse_args  # noqa: E402


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("on", "off"):
        raise SystemExit("usage: python scripts/sdpa_decode_probe.py on|off")
    if not torch.cuda.is_available():
        raise SystemExit("this probe needs a CUDA GPU")
    cudnn_on = sys.argv[1] == "on"
    torch.backends.cuda.enable_cudnn_sdp(cudnn_on)
    args = parse_args(["--device", "cuda"])
    torch.manual_seed(0)
    models = build_causal_lms(args, names=("bst", "llama"))
    prompt = torch.randint(0, args.vocab_size, (1, 600), device="cuda")
    for name in ("bst", "llama"):
        model = models[name].to("cuda").eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            cache = model(input_ids=prompt[:, :511], use_cache=True).past_key_values
            token, times = prompt[:, 511:512], []
            for _ in range(30):
                torch.cuda.synchronize()
                start = time.perf_counter()
                output = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = output.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        first = " ".join(f"{1000 * seconds:.0f}" for seconds in times[:6])
        print(f"cudnn_sdp={cudnn_on} {name}: median {1000 * statistics.median(times[2:]):.1f} ms a step, first {first}")


if __name__ == "__main__":
    main()
