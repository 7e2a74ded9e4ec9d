"""Next-token loss by slot inside a block: the diagnostic of scripts/evaluate.py, which other evaluations (the quality
experiment in scripts/experiments/) report too; and two SSM ablations: the SSM silenced, and its reach cut."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def loss_by_slot(model, input_ids, block_size, batch_size, device, bf16=False, skip_first_block=True):
    """Next-token loss and accuracy by slot inside a block, plus the overall loss, in one pass over the windows.

    `input_ids` is a (num_windows, length) LongTensor; every window is scored on its own, starting a fresh sequence.
    Window position t predicts token t + 1 and sits at slot t % block_size of its block, so the last position of a
    window predicts nothing and slot block_size - 1 gets one prediction fewer per window than the others.

    With `skip_first_block` (the default) the per-slot sums leave out the predictions of the window's first block
    (t < block_size): there no model, full attention included, has anything before the block to read, so they say
    nothing about context across block boundaries. Every prediction that is counted then has at least block_size
    earlier tokens in its window: a full-attention model is flat in slot, and a rise at the first slots is the cost
    of the block boundary that only a BST's SSM can bridge.

    Returns a dict: "nll" (block_size,) float64 summed negative log-likelihood per slot, "correct" (block_size,)
    int64 top-1 hits, "count" (block_size,) int64 predictions, and "total_nll" (float) / "total_count" (int) over
    ALL predicted positions of the windows (first block included: the loss that perplexity uses).
    """
    num_windows, length = input_ids.shape
    if length < 2:
        raise ValueError(f"Windows must hold at least 2 tokens, got length {length}.")
    slots = torch.arange(length - 1) % block_size
    counted = torch.arange(length - 1) >= (block_size if skip_first_block else 0)
    nll_by_position = torch.zeros(length - 1, dtype=torch.float64)
    correct_by_position = torch.zeros(length - 1, dtype=torch.int64)
    for start in tqdm(range(0, num_windows, batch_size), desc=f"length {length}", leave=False):
        batch = input_ids[start : start + batch_size].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (batch, length - 1)
        nll_by_position += nll.double().sum(0).cpu()
        correct_by_position += (logits.argmax(-1) == targets).sum(0).cpu()
    count_by_position = torch.full((length - 1,), num_windows, dtype=torch.int64)

    def by_slot(per_position):
        return torch.zeros(block_size, dtype=per_position.dtype).index_add_(0, slots[counted], per_position[counted])

    return {
        "nll": by_slot(nll_by_position),
        "correct": by_slot(correct_by_position),
        "count": by_slot(count_by_position),
        "total_nll": nll_by_position.sum().item(),
        "total_count": num_windows * (length - 1),
    }


def slot_groups(block_size):
    """Slot ranges that grow geometrically (0-3, 4-15, 16-63, 64-255, ...), the last one cut at block_size - 1:
    the loss changes fastest over the first slots of a block."""
    bounds = [0, 4]
    while bounds[-1] < block_size:
        bounds.append(bounds[-1] * 4)
    bounds = [bound for bound in bounds if bound < block_size] + [block_size]
    return list(zip(bounds[:-1], bounds[1:]))  # half-open [first, end)


def mean_loss(stats, first, end):
    """Mean loss per prediction over slots [first, end); None when none of them was scored."""
    count = stats["count"][first:end].sum().item()
    return stats["nll"][first:end].sum().item() / count if count else None


def summarise_slots(stats):
    """JSON-ready summary of `loss_by_slot`'s output: per-slot loss, accuracy and count, the grouped loss, and the
    context gain = mean loss at the first slots (0-3) minus mean loss over the last half of the block, in nats."""
    block_size = len(stats["count"])
    counts = stats["count"].tolist()
    early = mean_loss(stats, 0, min(4, block_size // 2))
    late = mean_loss(stats, block_size // 2, block_size)
    return {
        "block_size": block_size,
        "loss": [nll / count if count else None for nll, count in zip(stats["nll"].tolist(), counts)],
        "accuracy": [hits / count if count else None for hits, count in zip(stats["correct"].tolist(), counts)],
        "count": counts,
        "groups": [
            {"slots": f"{first}-{end - 1}", "loss": mean_loss(stats, first, end), "count": sum(counts[first:end])}
            for first, end in slot_groups(block_size)
        ],
        "context_gain": early - late if early is not None and late is not None else None,
    }


def ssm_sublayers(model) -> list[torch.nn.Module]:
    """The SSM sublayers of `model`: module attributes named `ssm`, as BST decoder layers have (None in the others)."""
    return [module.ssm for module in model.modules() if isinstance(getattr(module, "ssm", None), torch.nn.Module)]


@contextmanager
def ssm_zeroed(model):
    """Inside the block, every SSM sublayer (a module attribute named `ssm`, as BST decoder layers have) outputs zeros,
    in the full forward and in cached decoding alike: its context states then carry nothing, neither from earlier
    blocks nor from the block itself (nor does the residual SSM branch, where there is one). Forward hooks, so the
    model code is untouched; they are removed on exit. Yields the number of SSMs silenced."""
    ssm_modules = ssm_sublayers(model)
    handles = [
        ssm.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output)) for ssm in ssm_modules
    ]
    try:
        yield len(ssm_modules)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ssm_reach_limited(model, max_distance: int):
    """Inside the block, every SSM filter is cut after `max_distance` taps (K[l] = 0 for l >= max_distance), so a
    context state at position t reads the SSM inputs at t - max_distance + 1 .. t only.

    This separates what the SSM carries from beyond the attention span from what it adds as capacity: cut at the
    span (2W with previous-block attention), the SSM keeps every use it can make of text that attention sees too, and
    the loss that rises is what it brought from further back. Forward hooks on the kernels, removed on exit; the full
    forward only (scoring, `use_cache=False`): a cached forward runs the recurrence, not the kernel, and is refused,
    as is "mf" with "s4" kernels, which scans its blocks without forming a kernel. Yields the number of SSMs cut."""
    if max_distance < 1:
        raise ValueError(f"max_distance must be at least 1 (the current input's tap), got {max_distance}.")
    config = getattr(model, "config", None)
    if getattr(config, "bst_variant", None) == "mf" and getattr(config, "ssm_kernel", None) == "s4":
        raise ValueError('The SSM reach cannot be cut for bst_variant="mf" with "s4" kernels: they form no kernel.')
    ssm_modules = ssm_sublayers(model)

    def cut(module, inputs, taps):  # taps (H, length)
        taps = taps.clone()
        taps[..., max_distance:] = 0
        return taps

    def refuse_cache(module, args, kwargs):
        layer_cache = args[2] if len(args) > 2 else kwargs.get("layer_cache")
        if layer_cache is not None:
            raise ValueError("ssm_reach_limited cuts the kernel of the full forward; call the model with use_cache=False.")

    handles = [ssm.kernel_generator.register_forward_hook(cut) for ssm in ssm_modules]
    handles += [ssm.register_forward_pre_hook(refuse_cache, with_kwargs=True) for ssm in ssm_modules]
    try:
        yield len(ssm_modules)
    finally:
        for handle in handles:
            handle.remove()
