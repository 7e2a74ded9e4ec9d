"""Transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), run against BST.

The conformance bar for a model integration is the test suite Transformers runs on its own models. Those tests are not
installed with the wheel; they ship in the transformers 5.23.0 source distribution. This module fetches the sdist
with pip into a cache folder (`~/.cache/bst-tests`, or `$BST_TESTS_CACHE`), extracts its top-level `tests/*.py` into
an importable package there and runs `ModelTesterMixin` and `ConfigTester` on a tiny BST configuration. Nothing of
the sdist enters this repository. The module skips, with the reason, only when the registry cannot be reached.

Three files that `test_modeling_common.py` / `test_configuration_common.py` import are not in the sdist (it ships
only the top-level `tests/*.py`): `tests/exporters/test_export.py`, `tests/generation/test_utils.py` and
`tests/utils/test_configuration_utils.py`. We write small stand-ins for them (see `_STAND_INS`): the export and
generate() mixins become empty classes (so their tests do not run here; generation is covered by our own tests), and
`config_common_kwargs` is rebuilt from `PreTrainedConfig`'s own fields with non-default values, which is what the
upstream dict holds.

Every test we skip is listed in `SKIPPED_COMMON_TESTS` with the reason. Run it alone with
`pytest tests/test_transformers_common.py -ra`; the first run downloads ~10 MB.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import textwrap
import unittest
from pathlib import Path

import pytest
import torch


TRANSFORMERS_VERSION = "5.23.0"
PARAMETERIZED_VERSION = "0.9.0"
CACHE_DIR = Path(os.environ.get("BST_TESTS_CACHE", Path.home() / ".cache" / "bst-tests"))
SDIST_NAME = f"transformers-{TRANSFORMERS_VERSION}.tar.gz"
# The extracted tests become the package `hf_common_tests` so that their relative imports (`from .x import y`) work.
PACKAGE_ROOT = CACHE_DIR / f"transformers-{TRANSFORMERS_VERSION}-common-tests"
PACKAGE_NAME = "hf_common_tests"

# Stand-ins for the modules `test_modeling_common.py` and `test_configuration_common.py` import but the sdist lacks.
_STAND_INS = {
    "exporters/test_export.py": '''
        """Stand-in: tests/exporters/ is not in the sdist. Export tests do not run here."""


        class ExportTesterMixin:
            pass
    ''',
    "generation/test_utils.py": '''
        """Stand-in: tests/generation/ is not in the sdist. generate() is tested by the BST test suite itself."""


        class GenerationTesterMixin:
            pass
    ''',
    "utils/test_configuration_utils.py": '''
        """Stand-in: tests/utils/ is not in the sdist.

        `config_common_kwargs` gives every field of the base `PreTrainedConfig` a non-default value, so that
        `ConfigTester.check_config_arguments_init` can check a model config passes them all through.
        """

        config_common_kwargs = {
            "return_dict": False,
            "output_hidden_states": True,
            "output_attentions": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 5,
            "architectures": ["SomeOtherModel"],
            "id2label": {0: "label"},
            "label2id": {"label": "0"},
            "problem_type": "regression",
        }
    ''',
}


def _pip_download(args, what):
    """Runs `pip download` into the cache; skips the module (with pip's own words) when it cannot fetch."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(CACHE_DIR), *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"Could not download {what}: `pip download` timed out (is the package registry reachable?)")
    if result.returncode != 0:
        last_lines = " | ".join(result.stderr.strip().splitlines()[-3:])
        pytest.skip(f"Could not download {what} from the package registry (unreachable?): {last_lines}")


def _ensure_common_tests_package():
    """Downloads the sdist once and unpacks its top-level tests/*.py as the package `hf_common_tests`."""
    complete_marker = PACKAGE_ROOT / ".complete"
    if not complete_marker.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        sdist = CACHE_DIR / SDIST_NAME
        if not sdist.exists():
            # --no-binary makes pip fetch the source distribution, which is the only one that carries tests/.
            _pip_download(["--no-binary", ":all:", f"transformers=={TRANSFORMERS_VERSION}"], SDIST_NAME)
        package_dir = PACKAGE_ROOT / PACKAGE_NAME
        tests_prefix = f"transformers-{TRANSFORMERS_VERSION}/tests/"
        package_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name[len(tests_prefix) :] if member.name.startswith(tests_prefix) else ""
                if member.isfile() and relative.endswith(".py") and "/" not in relative:
                    (package_dir / relative).write_bytes(archive.extractfile(member).read())
        for relative, source in _STAND_INS.items():
            path = package_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(textwrap.dedent(source).lstrip())
        (package_dir / "__init__.py").touch()
        if not (package_dir / "test_modeling_common.py").exists():
            pytest.fail(f"{SDIST_NAME} has no tests/test_modeling_common.py: the sdist layout changed.")
        complete_marker.touch()  # written last: a run interrupted half-way extracts again next time
    if str(PACKAGE_ROOT) not in sys.path:
        sys.path.insert(0, str(PACKAGE_ROOT))


def _ensure_parameterized():
    """`test_modeling_common.py` needs the small `parameterized` package; fetch its wheel into the cache if absent."""
    try:
        importlib.import_module("parameterized")
        return
    except ImportError:
        pass
    wheel = CACHE_DIR / f"parameterized-{PARAMETERIZED_VERSION}-py2.py3-none-any.whl"
    if not wheel.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        _pip_download(["--only-binary", ":all:", f"parameterized=={PARAMETERIZED_VERSION}"], "parameterized")
    sys.path.insert(0, str(wheel))  # a pure-Python wheel is a zip archive Python imports from directly


_ensure_parameterized()
_ensure_common_tests_package()

from hf_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402

from modeling_bst import BSTConfig, BSTForCausalLM, BSTModel  # noqa: E402


class BSTModelTester:
    """Builds the tiny configuration and the inputs the common tests use (the role CausalLMModelTester plays for
    Transformers' own decoders). Blocks of 4 tokens and sequences of 7: every input has a full and a partial block."""

    def __init__(self, parent, bst_variant="sh", ssm_kernel="s4", batch_size=3, seq_length=7):
        self.parent = parent
        self.bst_variant = bst_variant
        self.ssm_kernel = ssm_kernel
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.intermediate_size = 37
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.block_size = 4
        self.pad_token_id = 0

    def get_config(self):
        return BSTConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            block_size=self.block_size,
            bst_variant=self.bst_variant,
            ssm_kernel=self.ssm_kernel,
            ssm_state_size=8,
            num_context_states=3 if self.bst_variant == "mf" else None,
            implicit_filter_features=4,
            implicit_filter_hidden_size=16,
            bst_layers=[1],  # layer 0 is a plain block-attention layer, layer 1 a BST layer: both kinds are tested
            max_position_embeddings=16,
            pad_token_id=self.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Right padding of different lengths per row, as Transformers' causal-LM testers use.
        attention_mask = torch.tril(torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}

    def create_and_check_model(self, config, inputs_dict):
        model = BSTModel(config).eval()
        with torch.no_grad():
            result = model(**inputs_dict)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))


class BSTCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BSTModel, BSTForCausalLM)
    bst_variant = "sh"
    ssm_kernel = "s4"

    def setUp(self):
        self.model_tester = BSTModelTester(self, bst_variant=self.bst_variant, ssm_kernel=self.ssm_kernel)
        self.config_tester = ConfigTester(self, config_class=BSTConfig, hidden_size=64, num_attention_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        self.model_tester.create_and_check_model(config, inputs_dict)
