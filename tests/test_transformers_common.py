"""Transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), run against BST.

The conformance bar for a model integration is the test suite Transformers runs on its own models. Those tests are not
installed with the wheel; they ship in the transformers 5.23.0 source distribution. This module fetches the sdist with
pip into a cache folder (`~/.cache/bst-tests`, or `$BST_TESTS_CACHE`), unpacks its top-level `tests/*.py` there as
the importable package `hf_common_tests`, and runs `ModelTesterMixin` and `ConfigTester` on tiny BST configurations.
Nothing of the sdist enters this repository. The module skips, with pip's message, only when the registry cannot be
reached.

Three modules that `test_modeling_common.py` / `test_configuration_common.py` import are not in the sdist (it ships
only the top-level `tests/*.py`): `tests/exporters/test_export.py`, `tests/generation/test_utils.py` and
`tests/utils/test_configuration_utils.py`. We write stand-ins for them (`_STAND_INS`): the export and generate() mixins
become empty classes, so their tests do not run here (this repository tests generate() itself), and
`config_common_kwargs` gives each field of the base `PreTrainedConfig` a non-default value, which is what the upstream
dict holds.

Tests that do not apply to BST are listed in `SKIPPED_COMMON_TESTS` with the reason; `pytest -ra` prints every skip.
The first run downloads ~11 MB; a run takes about 2 minutes on 2 CPU cores (3 configurations x ~170 tests).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import unittest
import warnings
from pathlib import Path

import pytest
import torch


TRANSFORMERS_VERSION = "5.23.0"
PARAMETERIZED_VERSION = "0.9.0"
CACHE_DIR = Path(os.environ.get("BST_TESTS_CACHE", Path.home() / ".cache" / "bst-tests"))
SDIST_NAME = f"transformers-{TRANSFORMERS_VERSION}.tar.gz"
PACKAGE_NAME = "hf_common_tests"  # a package, so that the tests' relative imports (`from .x import y`) work
PACKAGE_ROOT = CACHE_DIR / f"transformers-{TRANSFORMERS_VERSION}-common-tests"

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

        Every field of the base `PreTrainedConfig` with a non-default value: `ConfigTester.check_config_arguments_init`
        checks that a model config passes them all through.
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


def _pip_download(requirement, *pip_args):
    """`pip download` into the cache; skips the module, quoting pip, when the registry cannot be reached."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(CACHE_DIR)]
    try:
        result = subprocess.run([*command, *pip_args, requirement], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        reason = f"`pip download {requirement}` timed out: is the package registry reachable?"
        pytest.skip(reason, allow_module_level=True)
    if result.returncode != 0:
        pip_says = " | ".join(result.stderr.strip().splitlines()[-3:])
        pytest.skip(f"Could not download {requirement} from the package registry: {pip_says}", allow_module_level=True)


def _ensure_common_tests_package():
    """Downloads the sdist once and unpacks its top-level tests/*.py, plus the stand-ins, as `hf_common_tests`."""
    if not (PACKAGE_ROOT / PACKAGE_NAME / "__init__.py").exists():
        sdist = CACHE_DIR / SDIST_NAME
        if not sdist.exists():
            # --no-binary: the source distribution is the only one that carries tests/.
            _pip_download(f"transformers=={TRANSFORMERS_VERSION}", "--no-binary", ":all:")
        # Unpack into a private folder and rename it into place: a run killed half-way, or two runs at once, never
        # leave a half-written package behind.
        staging = Path(tempfile.mkdtemp(prefix="unpacking-", dir=CACHE_DIR))
        package_dir = staging / PACKAGE_NAME
        package_dir.mkdir()
        tests_prefix = f"transformers-{TRANSFORMERS_VERSION}/tests/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                name = member.name[len(tests_prefix) :] if member.name.startswith(tests_prefix) else ""
                if member.isfile() and name.endswith(".py") and "/" not in name:
                    (package_dir / name).write_bytes(archive.extractfile(member).read())
        if not (package_dir / "test_modeling_common.py").exists():
            pytest.fail(f"{SDIST_NAME} has no tests/test_modeling_common.py: the sdist layout changed.")
        for relative_path, source in _STAND_INS.items():
            path = package_dir / relative_path
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(textwrap.dedent(source).lstrip())
        (package_dir / "__init__.py").touch()  # last: its presence marks a complete package
        try:
            staging.rename(PACKAGE_ROOT)
        except OSError:  # another run got there first
            shutil.rmtree(staging)
    if str(PACKAGE_ROOT) not in sys.path:
        sys.path.insert(0, str(PACKAGE_ROOT))


def _ensure_parameterized():
    """`test_modeling_common.py` imports the small `parameterized` package: use its wheel from the cache if absent."""
    try:
        importlib.import_module("parameterized")
        return
    except ImportError:
        pass
    wheel = CACHE_DIR / f"parameterized-{PARAMETERIZED_VERSION}-py2.py3-none-any.whl"
    if not wheel.exists():
        _pip_download(f"parameterized=={PARAMETERIZED_VERSION}", "--only-binary", ":all:")
    sys.path.insert(0, str(wheel))  # a pure-Python wheel is a zip archive Python imports from directly


_ensure_parameterized()
_ensure_common_tests_package()

with warnings.catch_warnings():
    # The upstream tests use marks (flash_attn_test, torch_compile_test, ...) registered in their own conftest.
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from hf_common_tests.test_configuration_common import ConfigTester
    from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES  # noqa: E402

from modeling_bst import BSTConfig, BSTForCausalLM, BSTModel  # noqa: E402


class BSTModelTester:
    """Builds the tiny configuration and the inputs of the common tests (the role `CausalLMModelTester` plays for
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
            training_length=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Right padding of a different length in each row, as Transformers' causal-LM testers use.
        attention_mask = torch.tril(torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}

    def create_and_check_model(self, config, inputs_dict):
        model = BSTModel(config).eval()
        with torch.no_grad():
            result = model(**inputs_dict)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))


# Common tests that do not apply to BST, with the reason (`pytest -ra` prints it).
SKIPPED_COMMON_TESTS = {
    "test_attention_outputs": (
        "BST returns no attention weights: attention runs per block of W tokens, self- and cross-attention heads side "
        "by side, so there is no (batch, heads, length, length) map (hybrids such as Jamba and Bamba override this "
        "test too). `output_attentions=True` logs a warning and is ignored."
    ),
    "test_generation_tester_mixin_inheritance": (
        "tests/generation/test_utils.py (GenerationTesterMixin) is not in the transformers sdist; generate() is "
        "tested by this repository's own tests."
    ),
}


def _skipped(reason):
    def skipped_test(self, *args, **kwargs):
        self.skipTest(reason)

    return skipped_test


class BSTCommonTest(ModelTesterMixin, unittest.TestCase):
    """Single-head variant, "s4" kernel."""

    all_model_classes = (BSTModel, BSTForCausalLM)
    bst_variant = "sh"
    ssm_kernel = "s4"
    # The test reads a config file without a "# Copyright <year>" line as "added before 2023" and skips: run it.
    test_can_init_all_missing_weights_before_2023 = True

    locals().update({name: _skipped(reason) for name, reason in SKIPPED_COMMON_TESTS.items()})

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The common tests tell a base model from a causal LM by looking its class name up in Transformers' built-in
        # name tables (labels are only added for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, for example). A model
        # registered from outside the library with `AutoModel.register` is not in them: add BST while the class runs.
        cls._extended_tables = []
        for table, class_name in (
            (MODEL_MAPPING_NAMES, "BSTModel"),
            (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "BSTForCausalLM"),
        ):
            if BSTConfig.model_type not in table:
                table[BSTConfig.model_type] = class_name
                cls._extended_tables.append(table)

    @classmethod
    def tearDownClass(cls):
        for table in cls._extended_tables:
            table.pop(BSTConfig.model_type, None)
        super().tearDownClass()

    def setUp(self):
        self.model_tester = BSTModelTester(self, bst_variant=self.bst_variant, ssm_kernel=self.ssm_kernel)
        self.config_tester = ConfigTester(self, config_class=BSTConfig, hidden_size=64, num_attention_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        self.model_tester.create_and_check_model(config, inputs_dict)

    def test_retain_grad_hidden_states_attentions(self):
        # BST returns no attention weights (see SKIPPED_COMMON_TESTS): check the hidden-state gradients only.
        self.has_attentions = False
        try:
            super().test_retain_grad_hidden_states_attentions()
        finally:
            del self.has_attentions


class BSTMultiHeadUnstructuredCommonTest(BSTCommonTest):
    """Multi-head variant (one filter per head), "unstructured" (implicit) kernel."""

    bst_variant = "mh"
    ssm_kernel = "unstructured"


class BSTMultiFilterCommonTest(BSTCommonTest):
    """Multi-filter variant (3 context states per block), "s4" kernel."""

    bst_variant = "mf"
    ssm_kernel = "s4"
