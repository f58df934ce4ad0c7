"""The config's list of pair files becomes one LatentPairs; image pairs are encoded once."""

import numpy as np
import pytest
import torch
from PIL import Image

from sail_fast.data import encode as data_module
from sail_fast.data.records import PairRecord, write_pairs_jsonl
from sail_fast.data.sources import load_pairs
from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.runs.config import load_config


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24), dtype=np.uint8), "L")


@pytest.fixture(scope="module")
def stack():
    return tiny_stack("sd15", sample_size=8, in_channels=1)


def test_jsonl_pairs_are_encoded_once_then_read_from_the_cache(tmp_path, stack, monkeypatch):
    records = [PairRecord(f"a handwritten {i % 3}", _image(2 * i), _image(2 * i + 1)) for i in range(5)]
    write_pairs_jsonl(tmp_path / "pairs.jsonl", records)
    config = load_config(
        overrides=["model.tiny=sd15", "data.resolution=8", f"data.seed_pairs=[{tmp_path / 'pairs.jsonl'}]"]
    )
    calls = []
    real_encode = data_module.encode_pairs
    monkeypatch.setattr("sail_fast.data.sources.encode_pairs", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    kw = dict(model=config.model, data=config.data, cache_dir=tmp_path / "cache", log=lambda *_: None)
    first = load_pairs(config.data.seed_pairs, stack, **kw)
    second = load_pairs(config.data.seed_pairs, stack, **kw)
    assert len(calls) == 1 and len(first) == 5
    assert torch.equal(first.win, second.win) and first.prompts == second.prompts
    assert first.win.shape == (5, 1, 8, 8)
    # A latent shard next to the jsonl is read as is and concatenated; the cap keeps the first pairs.
    first.save(tmp_path / "more.safetensors")
    capped = config.data.model_copy(update={"max_seed_pairs": 7})
    both = load_pairs(
        [str(tmp_path / "pairs.jsonl"), str(tmp_path / "more.safetensors")], stack, **{**kw, "data": capped}
    )
    assert len(both) == 7 and torch.equal(both.win[5:], first.win[:2])


def test_bad_sources_say_what_is_wrong(tmp_path, stack):
    config = load_config(overrides=["model.tiny=sd15"])
    kw = dict(model=config.model, data=config.data, cache_dir=tmp_path, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="data.seed_pairs entry .*nothing.jsonl does not exist"):
        load_pairs([str(tmp_path / "nothing.jsonl")], stack, **kw)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a pairs.jsonl file"):
        load_pairs([str(tmp_path / "notes.txt")], stack, **kw)
    with pytest.raises(ValueError, match="data.seed_pairs is empty"):
        load_pairs([], stack, **kw)
