"""A saved BST checkpoint loads where the `modeling_bst` package does not exist (`trust_remote_code=True`).

Importing the package registers the classes for auto-class export, so `save_pretrained` writes `auto_map` into
config.json and copies `configuration_bst.py`, `modeling_bst.py` and the sibling modules it imports (`ssm_ops.py`,
`cache_bst.py`) flat next to the weights. A Hub user without our
package then loads the folder through the Auto classes. The proof runs in a fresh interpreter, started from a scratch
folder with an empty PYTHONPATH and a `sys.meta_path` finder that refuses to import `modeling_bst`, and compares its
logits with the in-process model's.
"""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import VARIANTS_AND_KERNELS, open_context_path, tiny_config

from bst_tools.tokenizer import train_bpe_tokenizer
from modeling_bst import BSTConfig, BSTForCausalLM


CODE_FILES = ("configuration_bst.py", "modeling_bst.py", "ssm_ops.py", "cache_bst.py")
# A checkpoint's code may import only what every Transformers user has: the standard library, torch, transformers and
# huggingface_hub (a hard dependency of transformers, whose own configs import `strict` from it).
ALLOWED_TOP_LEVEL_IMPORTS = set(sys.stdlib_module_names) | {"torch", "transformers", "huggingface_hub"}

# The start of every script run in a fresh interpreter: this package cannot be imported there.
BLOCK_PACKAGE = r"""
import importlib.abc, json, sys

class BlockBSTPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_bst" or name.startswith("modeling_bst."):
            raise ImportError(f"{name} is blocked in this process")
        return None

sys.meta_path.insert(0, BlockBSTPackage())
"""

# Runs in the fresh interpreter. argv: a JSON list of [folder, input_ids.pt, output.pt] triples.
LOAD_WITHOUT_PACKAGE = BLOCK_PACKAGE + r"""
try:
    import modeling_bst
    raise SystemExit("modeling_bst was importable: the block did not work")
except ImportError:
    pass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

for folder, input_path, output_path in json.loads(sys.argv[1]):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(input_path)).logits
    torch.save(
        {
            "logits": logits,
            "config": config.to_dict(),
            "config_class": f"{type(config).__module__}.{type(config).__name__}",
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
        },
        output_path,
    )
assert not any(name == "modeling_bst" or name.startswith("modeling_bst.") for name in sys.modules)
"""


def save_checkpoints(tmp_path):
    """One checkpoint per variant x kernel; returns [(name, model, folder, input_ids)]."""
    checkpoints = []
    for variant, kernel in VARIANTS_AND_KERNELS:
        torch.manual_seed(0)
        # bst_layers=[1]: a plain block-attention layer and a BST layer; 21 tokens = 2 full blocks of 8 + a partial.
        config = tiny_config(bst_variant=variant, ssm_kernel=kernel, bst_layers=[1])
        model = open_context_path(BSTForCausalLM(config)).eval()
        folder = tmp_path / f"bst-{variant}-{kernel}"
        model.save_pretrained(folder)
        input_ids = torch.randint(2, model.config.vocab_size, (2, 21))
        checkpoints.append((f"{variant}/{kernel}", model, folder, input_ids))
    return checkpoints


@pytest.fixture(scope="module")
def remote_loaded(tmp_path_factory):
    """Saves every checkpoint, loads them all in ONE fresh interpreter without the package (imports are slow)."""
    tmp_path = tmp_path_factory.mktemp("remote_code")
    checkpoints = save_checkpoints(tmp_path)
    jobs = []
    for name, _, folder, input_ids in checkpoints:
        input_path = folder.parent / f"{folder.name}-input.pt"
        torch.save(input_ids, input_path)
        jobs.append([str(folder), str(input_path), str(folder.parent / f"{folder.name}-output.pt")])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    environment = {
        **os.environ,
        "PYTHONPATH": "",  # the repository must not be importable, only the checkpoint folders
        "PYTHONNOUSERSITE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),  # where transformers copies remote code; keep it private
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, json.dumps(jobs)],
        cwd=scratch,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"Loading without the package failed:\n{result.stderr[-4000:]}"
    return [
        (name, model, folder, input_ids, torch.load(job[2]))
        for (name, model, folder, input_ids), job in zip(checkpoints, jobs)
    ]


def test_save_pretrained_writes_auto_map_and_code_files(tmp_path):
    model = BSTForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_bst.BSTConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_bst.BSTForCausalLM"
    for name in CODE_FILES:
        assert (tmp_path / name).is_file(), f"save_pretrained did not copy {name}"


def test_code_files_are_flat_and_import_only_torch_transformers_stdlib(tmp_path):
    BSTForCausalLM(tiny_config()).save_pretrained(tmp_path)
    copied = {path.name for path in tmp_path.glob("*.py")}
    assert set(CODE_FILES) <= copied
    for name in sorted(copied):
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in ALLOWED_TOP_LEVEL_IMPORTS, f"{name} imports {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in ALLOWED_TOP_LEVEL_IMPORTS, f"{name} imports {node.module}"
                else:
                    # transformers copies and rewrites only `from .module import name` (one level, a sibling file).
                    assert node.level == 1 and node.module is not None, f"{name}: unsupported relative import"
                    assert f"{node.module}.py" in copied, f"{name} imports .{node.module}, which was not copied"


def test_loads_without_package_with_identical_logits(remote_loaded):
    for name, model, _, input_ids, remote in remote_loaded:
        # The classes came from the checkpoint folder (transformers' dynamic-module cache), not from our package.
        assert remote["model_class"].startswith("transformers_modules.") and remote["model_class"].endswith(
            ".modeling_bst.BSTForCausalLM"
        ), name
        assert remote["config_class"].endswith(".configuration_bst.BSTConfig"), name
        with torch.no_grad():
            expected = model(input_ids=input_ids).logits
        torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=1e-5, msg=f"{name}: logits differ")


def test_remote_config_matches(remote_loaded):
    for name, model, _, _, remote in remote_loaded:
        expected = model.config.to_dict()
        for key in ("bst_variant", "ssm_kernel", "bst_layers", "num_context_states", "block_size", "vocab_size"):
            assert remote["config"][key] == expected[key], f"{name}: {key}"
        assert remote["config"]["model_type"] == BSTConfig.model_type


def test_registered_package_loads_the_same_folder(tmp_path):
    """With the package imported, the Auto classes use it (no trust_remote_code needed), same logits."""
    from transformers import AutoModelForCausalLM

    model = open_context_path(BSTForCausalLM(tiny_config(bst_variant="mf", ssm_kernel="s4"))).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BSTForCausalLM
    input_ids = torch.randint(2, model.config.vocab_size, (1, 19))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)


TOKENIZER_WITHOUT_CODE = BLOCK_PACKAGE + r"""
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
print(json.dumps({
    "class": type(tokenizer).__name__,
    "ids": tokenizer("to be, or not to be")["input_ids"],
    "remote_modules": sorted(name for name in sys.modules if name.startswith("transformers_modules")),
}))
"""


def test_tokenizer_loads_without_any_model_code(tmp_path):
    """The tokenizer is data (tokenizer.json + tokenizer_config.json naming a built-in class). AutoTokenizer in
    transformers 5.23 still reads config.json through AutoConfig first, whose `auto_map` makes a bare call ask
    "Do you wish to run the custom code?"; `trust_remote_code=False` answers no up front and the tokenizer loads from
    its JSON files, with no prompt and no code from the folder."""
    BSTForCausalLM(tiny_config(vocab_size=300)).save_pretrained(tmp_path / "model")
    tokenizer = train_bpe_tokenizer(["to be, or not to be: that is the question"] * 20, 300, show_progress=False)
    tokenizer.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "TokenizersBackend"
    )
    environment = {**os.environ, "PYTHONPATH": "", "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TOKENIZER_WITHOUT_CODE, str(tmp_path / "model")],
        cwd=tmp_path,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {
        "class": "TokenizersBackend",
        "ids": tokenizer("to be, or not to be")["input_ids"],
        "remote_modules": [],
    }
