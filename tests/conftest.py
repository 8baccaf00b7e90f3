"""Shared pytest fixtures: a tiny in-process tokenizer and the path to the oracle fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# Sibling of the project checkout (CI clones the project beside shared/).
SHARED_FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"

# A small corpus in the style of Ferret conversations; the trainer adds the template texts.
TINY_CORPUS = [
    "The dog [102, 33, 640, 720] is on the grass.",
    "A red circle [125, 200, 375, 533] is next to a blue square [575, 166, 825, 500].",
    "What is the object in [120, 300, 560, 880] <region_fea>?",
    "What is at [500, 400] <region_fea>? It is a green triangle.",
    "There are two red circles [83, 125, 291, 437], [625, 187, 791, 437] in the image.",
    "Describe the region [40, 30, 200, 130] <region_fea> in detail.",
    "A cat sits on the sofa. The lamp is on. Yes. No. left right top bottom",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A LLaMA-like BPE tokenizer (BOS <s>, EOS </s>, pad <unk>, <region_fea>, <image>)
    trained in-process in milliseconds. Session-scoped: do not mutate it."""
    from ferret.data.synthetic_tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_CORPUS * 4, vocab_size=600)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """Path to ../shared/fixtures (outputs of the released Ferret code); skips when absent."""
    path = SHARED_FIXTURES.resolve()
    if not path.is_dir():
        pytest.skip(f"oracle fixtures folder {path} is absent (expected beside the project checkout)")
    return path
