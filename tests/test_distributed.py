"""Data-parallel training on CPU over gloo gives what one process gives on the same global batch.

Two processes are started once (torch.multiprocessing, gloo, rendezvous through a file so no port is needed); each
runs one tiny BST on its half of a global batch, wrapped once in DDP and once in FSDP2 (`fully_shard` on every
`BSTDecoderLayer` and on the root, over a CPU device mesh). Rank 0 writes the averaged loss and the full gradients
to disk and the test compares them with a single process on the whole batch.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PRESET = os.path.join(REPO_ROOT, "configuration", "bst-tiny.json")
WORLD_SIZE = 2


def build_model():
    from modeling_bst import BSTConfig, BSTForCausalLM

    torch.manual_seed(0)
    model = BSTForCausalLM(BSTConfig.from_json_file(TINY_PRESET))
    model.train()
    return model


def global_batch():
    # 4 sequences of 40 tokens: 5 blocks of 8, so the state-space context crosses blocks.
    return torch.randint(2, 128, (4, 40), generator=torch.Generator().manual_seed(1))


def averaged_loss(loss):
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def worker(rank, init_file, output_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from modeling_bst.modeling_bst import BSTDecoderLayer

    local_batch = global_batch().chunk(WORLD_SIZE)[rank]
    results = {}

    ddp_model = DistributedDataParallel(build_model())
    loss = ddp_model(input_ids=local_batch, labels=local_batch).loss
    loss.backward()  # DDP averages the gradients over the processes
    results["ddp"] = {
        "loss": averaged_loss(loss),
        "grads": {name: p.grad.clone() for name, p in ddp_model.module.named_parameters()},
    }

    fsdp_model = build_model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    wrapped = [layer for layer in fsdp_model.modules() if isinstance(layer, BSTDecoderLayer)]
    for layer in wrapped:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp_model, mesh=mesh)
    loss = fsdp_model(input_ids=local_batch, labels=local_batch).loss
    loss.backward()  # FSDP reduce-scatters the averaged gradients into shards
    results["fsdp"] = {
        "loss": averaged_loss(loss),
        "grads": {name: p.grad.full_tensor() for name, p in fsdp_model.named_parameters()},
        "wrapped_layers": len(wrapped),
        "sharded": all(type(p).__name__ == "DTensor" for p in fsdp_model.parameters()),
    }

    if rank == 0:
        torch.save(results, output_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    output_file = str(folder / "results.pt")
    mp.spawn(worker, args=(str(folder / "rendezvous"), output_file), nprocs=WORLD_SIZE, join=True)
    return torch.load(output_file)


@pytest.fixture(scope="module")
def single_process():
    model = build_model()
    batch = global_batch()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(distributed_results, single_process, strategy):
    loss, grads = single_process
    result = distributed_results[strategy]
    # Both halves hold the same number of predicted tokens, so the mean of the two means is the global mean.
    torch.testing.assert_close(result["loss"], loss, rtol=1e-6, atol=1e-6)
    assert result["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_wraps_every_decoder_layer(distributed_results):
    result = distributed_results["fsdp"]
    assert result["wrapped_layers"] == 2 and result["sharded"]
