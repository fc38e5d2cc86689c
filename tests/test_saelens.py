"""SAELens 6.54 as a real client: its own activation store and training runner train an SAE
for a few hundred steps on `blocks.1.hook_resid_post` of a converted model, from a
pre-tokenized in-memory dataset (no Hub), with (a) the HookedTransformer of
`to_hooked_transformer` and (b) our GQATransformer passed as SAELens's model.

The activations SAELens's store computes equal transformers' hidden states for the same
tokens (fp32, 1e-5: a different code path, values of magnitude ~1-10 after two layers, where
fp32's spacing is ~1e-6), and the SAE's training loss goes down. Skipped where sae-lens is not
installed (`pip install -e '.[tl,sae]'`), except in CI, where they fail instead.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from gqa_convert import GQATransformer, convert
from tests.hf_models import load_hf, make_hf_checkpoint
from tests.test_families import GRANITE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sae_lens") is None and not os.environ.get("CI"),
    reason="sae-lens not installed: pip install -e '.[tl,sae]'",
)

LAYER, CONTEXT, BATCH_TOKENS, STEPS = 1, 32, 128, 300
CASES = {"llama-gqa4": ("llama", {}), "granite": ("granite", GRANITE)}


def token_rows(n_rows: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    """Pre-tokenized rows [n_rows, CONTEXT] (SAELens reads an `input_ids` column as tokens)."""
    return torch.randint(0, vocab, (n_rows, CONTEXT), generator=torch.Generator().manual_seed(seed))


def runner_config(d_model: int):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig

    return LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d_model, d_sae=4 * d_model, l1_coefficient=0.1),
        model_name="converted-toy",  # a label: the model itself is passed in
        hook_name=f"blocks.{LAYER}.hook_resid_post",
        dataset_path="",  # the dataset is passed in too
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=False,
        training_tokens=STEPS * BATCH_TOKENS,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        lr=1e-3,
        device="cpu",
        dtype="float32",
        seed=0,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None,
        checkpoint_path=None,
        verbose=False,
    )


def model_of_kind(kind: str, out):
    if kind == "hooked_transformer":
        from gqa_convert.interop import to_hooked_transformer

        return to_hooked_transformer(out)
    return GQATransformer.from_pretrained(out)


def train(kind: str, tmp_path, case: str):
    """Train with SAELens's runner; returns the runner, the per-step losses, the source."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAETrainingRunner

    family, overrides = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **overrides)
    out = convert(src, tmp_path / "out", verify=False)
    model = model_of_kind(kind, out)
    dataset = Dataset.from_dict({"input_ids": token_rows(256).tolist()})
    runner = LanguageModelSAETrainingRunner(
        runner_config(model.cfg.d_model), override_dataset=dataset, override_model=model
    )
    losses: list[float] = []
    forward = runner.sae.training_forward_pass

    def recording(step_input):  # SAELens's own forward pass; we only note its loss
        output = forward(step_input)
        losses.append(output.loss.item())
        return output

    runner.sae.training_forward_pass = recording
    runner.run()
    return runner, losses, src


def assert_store_equals_hf(runner, src) -> None:
    """What the store computes for a batch of its tokens = HF's hidden state after LAYER."""
    store = runner.activations_store
    tokens = store.get_batch_tokens()  # [batch, CONTEXT], from the dataset
    acts = store.get_activations(tokens)  # [batch, CONTEXT, d_model]
    with torch.no_grad():
        hidden = load_hf(src)(tokens, output_hidden_states=True).hidden_states[LAYER + 1]
    torch.testing.assert_close(acts, hidden, atol=1e-5, rtol=0)


def assert_loss_went_down(losses: list[float]) -> None:
    assert len(losses) == STEPS
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_sae_on_the_hooked_transformer(tmp_path):
    """(a) TL 3.9's HookedTransformer from to_hooked_transformer."""
    runner, losses, src = train("hooked_transformer", tmp_path, "llama-gqa4")
    assert_store_equals_hf(runner, src)
    assert_loss_went_down(losses)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sae_on_gqa_transformer(tmp_path, case):
    """(b) our model as SAELens's model, also for a family TL 3.9 cannot express (Granite)."""
    runner, losses, src = train("gqa_transformer", tmp_path, case)
    assert_store_equals_hf(runner, src)
    assert_loss_went_down(losses)
