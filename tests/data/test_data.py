"""Preference-pair data: readers, latent caching, batches and the mixup sampler."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sail_fast.data.encode import encode_pairs
from sail_fast.data.latent_pairs import LatentPairs, PairBatch
from sail_fast.data.records import (
    PairRecord,
    ReadStats,
    read_pairs_jsonl,
    read_pickapic_parquet,
    write_pairs_jsonl,
)
from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.dpo.mixup import MixupSampler

# ----------------------------------------------------------------------------- helpers


def _pattern(w, h, seed, mode="RGB"):
    """A random, left-right asymmetric image (so a mirror is never the identity)."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    arr[..., : w // 4, :] = 0  # a dark left band breaks any accidental symmetry
    arr[0, -1, :] = 255  # full range, so [-1, 1] is reached exactly
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def _encoded(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _pixels(src):
    img = (
        Image.open(io.BytesIO(src))
        if isinstance(src, bytes)
        else (src if isinstance(src, Image.Image) else Image.open(src))
    )
    return np.asarray(img.convert("RGB"))


def _to_unit(arr):
    arr = np.asarray(arr, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def _write_parquet(path, rows, drop=()):
    cols = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "image_0_uid": []}
    for i, (caption, a, b, label) in enumerate(rows):
        cols["caption"].append(caption)
        cols["jpg_0"].append(a)
        cols["jpg_1"].append(b)
        cols["label_0"].append(label)
        cols["image_0_uid"].append(f"uid{i}")
    for name in drop:
        del cols[name]
    pq.write_table(pa.table(cols), path)
    return path


def _hand_pairs(prompts, prompt_index, sources, *, sdxl=False, seed=0, latent_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    m, u = len(prompt_index), len(prompts)
    return LatentPairs(
        win=torch.randn(m, 4, 3, 3, generator=g).to(latent_dtype),
        lose=torch.randn(m, 4, 3, 3, generator=g).to(latent_dtype),
        prompt_index=torch.tensor(prompt_index, dtype=torch.int64),
        prompts=prompts,
        prompt_embeds=torch.randn(u, 5, 6, generator=g),
        pooled_prompt_embeds=torch.randn(u, 7, generator=g) if sdxl else None,
        time_ids_win=torch.randint(0, 1000, (m, 6), generator=g).float() if sdxl else None,
        time_ids_lose=torch.randint(0, 1000, (m, 6), generator=g).float() if sdxl else None,
        label=torch.rand(m, generator=g),
        source=sources,
    )


def _assert_same(a: LatentPairs, b: LatentPairs):
    for name in LatentPairs._TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.prompts == b.prompts and a.source == b.source


# ----------------------------------------------------------------------------- readers


def test_pickapic_reader_puts_the_winner_first_and_counts_ties(tmp_path):
    imgs = [_encoded(_pattern(8, 8, s), "JPEG") for s in range(6)]
    rows = [("zero wins", imgs[0], imgs[1], 1.0), ("tie", imgs[2], imgs[3], 0.5), ("one wins", imgs[4], imgs[5], 0.0)]
    f = _write_parquet(tmp_path / "train-0.parquet", rows)
    _write_parquet(tmp_path / "train-1.parquet", [("tie 2", imgs[0], imgs[1], 0.5)])

    records, stats = read_pickapic_parquet(f)
    assert [r.prompt for r in records] == ["zero wins", "one wins"]
    assert records[0].win == imgs[0] and records[0].lose == imgs[1]
    assert records[1].win == imgs[5] and records[1].lose == imgs[4]
    assert all(r.label == 1.0 and r.source == "human" for r in records)
    assert records[1].origin == f"{f}:2"
    assert (stats.read, stats.kept, stats.dropped_ties) == (3, 2, 1)
    assert str(stats) == "read 3 rows, kept 2 pairs, dropped 1 ties"

    # A directory reads every shard, in name order.
    records, stats = read_pickapic_parquet(tmp_path)
    assert len(records) == 2 and stats == ReadStats(read=4, kept=2, dropped_ties=2)


def test_pickapic_reader_errors_name_file_and_columns(tmp_path):
    img = _encoded(_pattern(8, 8, 0), "JPEG")
    bad = _write_parquet(tmp_path / "no_jpg1.parquet", [("c", img, img, 1.0)], drop=("jpg_1",))
    with pytest.raises(ValueError) as e:
        read_pickapic_parquet([bad])
    msg = str(e.value)
    assert "no_jpg1.parquet" in msg and "'jpg_1'" in msg and "image_0_uid" in msg

    odd = _write_parquet(tmp_path / "odd.parquet", [("a", img, img, 1.0), ("b", img, img, 0.3)])
    with pytest.raises(ValueError, match=r"odd\.parquet:1: label_0"):
        read_pickapic_parquet(odd)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_pickapic_parquet(tmp_path / "nope.parquet")


def test_jsonl_reader_resolves_paths_against_the_jsonl_directory(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for name, s in [("a.png", 0), ("b.png", 1)]:
        _pattern(8, 8, s).save(data / "imgs" / name)
    lines = [
        json.dumps({"prompt": "p1", "win": "imgs/a.png", "lose": "imgs/b.png"}),
        "",
        json.dumps({"prompt": "p2", "win": "imgs/b.png", "lose": "imgs/a.png", "label": 0.75, "source": "sail"}),
    ]
    (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # the reader must not resolve against the working directory

    records, stats = read_pairs_jsonl("data/pairs.jsonl")
    assert (stats.read, stats.kept, stats.dropped_ties) == (2, 2, 0)
    assert [(r.prompt, r.label, r.source) for r in records] == [("p1", 1.0, "human"), ("p2", 0.75, "sail")]
    assert np.array_equal(_pixels(records[0].win), np.asarray(_pattern(8, 8, 0)))
    assert records[1].origin.endswith("pairs.jsonl:3")


@pytest.mark.parametrize(
    "bad_line, match",
    [
        (
            '{"prompt": "p", "win": "imgs/a.png", "lose": "imgs/missing.png"}',
            r"pairs\.jsonl:2: lose image 'imgs/missing\.png' not found",
        ),
        ('{"prompt": "p", "win": "imgs/a.png", ', r"pairs\.jsonl:2: not valid JSON"),
        ('{"prompt": "p", "win": "imgs/a.png"}', r"pairs\.jsonl:2: missing key\(s\) \['lose'\]"),
        ('{"prompt": "p", "win": "imgs/a.png", "lose": "imgs/a.png", "label": 2}', r"pairs\.jsonl:2: label must be"),
    ],
)
def test_jsonl_reader_errors_name_file_and_line(tmp_path, bad_line, match):
    (tmp_path / "imgs").mkdir()
    _pattern(8, 8, 0).save(tmp_path / "imgs" / "a.png")
    good = json.dumps({"prompt": "p", "win": "imgs/a.png", "lose": "imgs/a.png"})
    (tmp_path / "pairs.jsonl").write_text(good + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=match):
        read_pairs_jsonl(tmp_path / "pairs.jsonl")


def test_jsonl_write_read_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    on_disk = src / "disk.png"
    _pattern(10, 6, 1).save(on_disk)
    jpg = _encoded(_pattern(6, 10, 2), "JPEG")
    pil = _pattern(7, 7, 3)
    records = [
        PairRecord("from disk", on_disk, jpg, label=1.0, source="human"),
        PairRecord("in memory", pil, str(on_disk), label=0.6, source="sail"),
    ]
    out = write_pairs_jsonl(tmp_path / "out" / "pairs.jsonl", records)

    stored = [json.loads(line) for line in out.read_text().splitlines()]
    for entry in stored:
        for key in ("win", "lose"):
            assert not entry[key].startswith("/") and (out.parent / entry[key]).is_file()
    assert stored[0]["lose"].startswith("images/") and stored[0]["lose"].endswith(".png")

    back, stats = read_pairs_jsonl(out)
    assert stats.kept == 2
    assert [(r.prompt, r.label, r.source) for r in back] == [(r.prompt, r.label, r.source) for r in records]
    for a, b in zip(records, back):
        for key in ("win", "lose"):
            assert np.array_equal(_pixels(getattr(a, key)), _pixels(getattr(b, key))), key


# ----------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def vae_stack():
    return tiny_stack("sd15", with_vae=True)


@pytest.fixture(scope="module")
def gray_stack():
    stack = tiny_stack("sd15", in_channels=1)
    assert stack.vae is None
    return stack


@pytest.fixture(scope="module")
def sdxl_stack():
    return tiny_stack("sdxl", in_channels=3)


def test_encode_with_vae_samples_the_scaled_posterior(vae_stack):
    # Already 16x16 RGB, so preprocessing is only the [-1, 1] scaling.
    images = [_pattern(16, 16, s) for s in range(4)]
    records = [PairRecord("a", images[0], images[1]), PairRecord("b", images[2], _encoded(images[3], "PNG"))]
    out = encode_pairs(records, vae_stack, resolution=16, dtype=torch.float16, progress=False)
    scale = vae_stack.vae_scale_factor
    assert out.win.shape == out.lose.shape == (2, 4, 16 // scale, 16 // scale)
    assert out.win.dtype == torch.float16 and out.prompt_embeds.dtype == torch.float16
    assert out.time_ids_win is None and out.pooled_prompt_embeds is None
    assert out.label.dtype == torch.float32 and out.source == ["human", "human"]

    pixels = torch.stack([_to_unit(im) for im in images])
    with torch.no_grad():
        dist = vae_stack.vae.encode(pixels).latent_dist
    sf = vae_stack.vae.config.scaling_factor
    got = torch.stack([out.win[0], out.lose[0], out.win[1], out.lose[1]]).float() / sf
    z = (got - dist.mean) / dist.std
    # A posterior sample: standardised residuals are N(0, 1), not 0 (the mode) nor off-scale.
    assert 0.8 < z.pow(2).mean().item() < 1.2 and z.abs().max() < 6

    # Deterministic in seed and independent of batch_size (one noise generator per image).
    again = encode_pairs(records, vae_stack, resolution=16, batch_size=1, progress=False)
    torch.testing.assert_close(again.win, out.win.float(), atol=2e-3, rtol=2e-3)
    other = encode_pairs(records, vae_stack, resolution=16, seed=1, progress=False)
    assert not torch.allclose(other.win, again.win)


def test_encode_undecodable_image_names_the_record(vae_stack):
    records = [PairRecord("a", b"not an image", _pattern(16, 16, 0), origin="shard.parquet:7")]
    with pytest.raises(ValueError, match=r"shard\.parquet:7: could not decode the win image"):
        encode_pairs(records, vae_stack, resolution=16, progress=False)


def test_pixel_space_latents_are_the_resized_cropped_images(gray_stack):
    wide = _pattern(48, 32, 0, "L")  # short side already 32: crop only, columns 8..39
    tall_rgb = _pattern(64, 80, 1)  # resized to 32x40 (bicubic), rows 4..35, converted to L
    records = [PairRecord("x", wide, tall_rgb)]
    out = encode_pairs(records, gray_stack, resolution=32, progress=False)
    assert out.win.shape == (1, 1, 32, 32) and out.win.dtype == torch.float32

    expect_win = _to_unit(np.asarray(wide)[:, 8:40])
    expect_lose = _to_unit(np.asarray(tall_rgb.convert("L").resize((32, 40), Image.Resampling.BICUBIC))[4:36])
    assert torch.equal(out.win[0], expect_win)
    assert torch.equal(out.lose[0], expect_lose)
    assert out.win.min() == -1.0 and out.win.max() == 1.0

    flipped = encode_pairs(records, gray_stack, resolution=32, flip="always", progress=False)
    assert torch.equal(flipped.win, out.win.flip(-1)) and torch.equal(flipped.lose, out.lose.flip(-1))
    assert not torch.equal(flipped.win, out.win)


def test_random_flip_is_seeded_and_shared_by_winner_and_loser(gray_stack):
    records = [PairRecord(f"p{i}", _pattern(32, 32, 2 * i, "L"), _pattern(32, 32, 2 * i + 1, "L")) for i in range(12)]
    plain = encode_pairs(records, gray_stack, resolution=32, progress=False)
    rand = encode_pairs(records, gray_stack, resolution=32, flip="random", seed=3, batch_size=5, progress=False)
    flips = []
    for i in range(len(records)):
        win_flipped = torch.equal(rand.win[i], plain.win[i].flip(-1))
        assert win_flipped or torch.equal(rand.win[i], plain.win[i])
        assert torch.equal(rand.lose[i], plain.lose[i].flip(-1) if win_flipped else plain.lose[i])
        flips.append(win_flipped)
    assert 0 < sum(flips) < len(flips)
    same = encode_pairs(records, gray_stack, resolution=32, flip="random", seed=3, batch_size=12, progress=False)
    assert torch.equal(same.win, rand.win)


def test_each_prompt_is_encoded_once(gray_stack, monkeypatch):
    calls = []
    original = gray_stack.encode_prompts

    def counting(prompts):
        calls.append(list(prompts))
        return original(prompts)

    monkeypatch.setattr(gray_stack, "encode_prompts", counting)
    img = _pattern(32, 32, 0, "L")
    prompts = ["a cat", "a dog", "a cat", "", "a dog", "a bird"]
    out = encode_pairs(
        [PairRecord(p, img, img) for p in prompts], gray_stack, resolution=32, batch_size=2, progress=False
    )
    encoded = [p for call in calls for p in call]
    assert sorted(encoded) == sorted(["a cat", "a dog", "a bird", ""])
    assert out.prompts == ["a cat", "a dog", "a bird", ""]
    assert out.prompt_index.tolist() == [0, 1, 0, 3, 1, 2]
    monkeypatch.undo()
    torch.testing.assert_close(out.prompt_embeds, gray_stack.encode_prompts(out.prompts).prompt_embeds)


@pytest.fixture(scope="module")
def sdxl_pairs(sdxl_stack):
    records = [
        PairRecord("a red cube", _pattern(40, 24, 0), _pattern(20, 30, 1)),  # (w, h)
        PairRecord("a blue ball", _pattern(16, 16, 2), _pattern(16, 16, 3), label=0.7, source="sail"),
    ]
    return records, encode_pairs(records, sdxl_stack, resolution=16, progress=False)


def test_sdxl_time_ids_come_from_real_size_and_crop(sdxl_stack, sdxl_pairs):
    records, out = sdxl_pairs
    # 40x24 -> 27x16 (short side 16), crop left round(11/2)=6; 20x30 -> 16x24, crop top 4.
    assert out.time_ids_win[0].tolist() == [24, 40, 0, 6, 16, 16]
    assert out.time_ids_lose[0].tolist() == [30, 20, 4, 0, 16, 16]
    assert out.time_ids_win[1].tolist() == [16, 16, 0, 0, 16, 16]
    assert out.win.shape == (2, 3, 16, 16)
    assert out.pooled_prompt_embeds.shape == (3, sdxl_stack.text_encoder_2.config.projection_dim)
    assert out.label.tolist() == pytest.approx([1.0, 0.7]) and out.source == ["human", "sail"]
    # Mirrored, the kept window starts 27 - 16 - 6 = 5 pixels from the left.
    flipped = encode_pairs(records[:1], sdxl_stack, resolution=16, flip="always", progress=False)
    assert flipped.time_ids_win[0].tolist() == [24, 40, 0, 5, 16, 16]


def test_caption_dropout_switches_to_the_encoded_empty_prompt(sdxl_stack, sdxl_pairs):
    _, pairs = sdxl_pairs
    empty = sdxl_stack.encode_prompts([""])
    real = sdxl_stack.encode_prompts(["a red cube", "a blue ball"])
    idx = torch.tensor([1, 0, 1])

    kept = pairs.batch(idx, caption_dropout=0.0)
    torch.testing.assert_close(kept.prompt_embeds, real.prompt_embeds[idx])
    torch.testing.assert_close(kept.pooled_prompt_embeds, real.pooled_prompt_embeds[idx])
    assert torch.equal(kept.win, pairs.win[idx]) and torch.equal(kept.time_ids_lose, pairs.time_ids_lose[idx])
    assert kept.label.tolist() == pytest.approx([0.7, 1.0, 0.7])

    dropped = pairs.batch(idx, caption_dropout=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dropped.prompt_embeds, empty.prompt_embeds.expand(3, -1, -1))
    torch.testing.assert_close(dropped.pooled_prompt_embeds, empty.pooled_prompt_embeds.expand(3, -1))
    assert torch.equal(dropped.win, kept.win)  # only the conditioning changes

    with pytest.raises(ValueError, match="caption_dropout"):
        pairs.batch(idx, caption_dropout=1.5)


def test_pair_batch_to_keeps_label_float32(sdxl_pairs):
    _, pairs = sdxl_pairs
    batch = pairs.batch(torch.tensor([0, 1])).to("cpu", torch.float16)
    assert isinstance(batch, PairBatch) and len(batch) == 2
    assert batch.win.dtype == batch.prompt_embeds.dtype == batch.pooled_prompt_embeds.dtype == torch.float16
    assert batch.time_ids_win.dtype == torch.float16
    assert batch.label.dtype == torch.float32


# ----------------------------------------------------------------------------- LatentPairs


def test_save_load_round_trip_is_exact(tmp_path):
    pairs = _hand_pairs(["a", "b", ""], [0, 1, 1, 2], ["human", "sail", "human", "human"], sdxl=True)
    pairs.save(tmp_path / "shard.safetensors")
    _assert_same(LatentPairs.load(tmp_path / "shard.safetensors"), pairs)

    sd15 = _hand_pairs(["x", ""], [0, 0], ["human", "human"], latent_dtype=torch.float32)
    sd15.save(tmp_path / "sd15.safetensors")
    _assert_same(LatentPairs.load(str(tmp_path / "sd15.safetensors")), sd15)

    # A directory of shards loads as their concatenation (in name order).
    shard_dir = tmp_path / "shards"
    second = _hand_pairs(["b", "c", ""], [1, 0], ["sail", "sail"], sdxl=True, seed=1)
    pairs.save(shard_dir / "0.safetensors")
    second.save(shard_dir / "1.safetensors")
    _assert_same(LatentPairs.load(shard_dir), LatentPairs.cat([pairs, second]))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        LatentPairs.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="junk.safetensors"):
        LatentPairs.load(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign\.safetensors: not a LatentPairs shard"):
        LatentPairs.load([foreign])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LatentPairs.load(tmp_path / "empty")


def test_cat_merges_prompt_tables_and_subset_compacts_them():
    a = _hand_pairs(["cat", "dog", ""], [0, 1, 2], ["human"] * 3, seed=0)
    b = _hand_pairs(["dog", "bird", ""], [1, 0, 0], ["sail"] * 3, seed=1)
    both = LatentPairs.cat([a, b])
    assert len(both) == 6 and both.prompts == ["cat", "dog", "bird", ""]
    assert [both.prompts[i] for i in both.prompt_index] == ["cat", "dog", "", "bird", "dog", "dog"]
    assert torch.equal(both.win, torch.cat([a.win, b.win])) and both.source == ["human"] * 3 + ["sail"] * 3
    # Each pair keeps its own prompt's embedding; a shared prompt takes its first occurrence.
    assert torch.equal(both.prompt_embeds[both.prompt_index[:3]], a.prompt_embeds[a.prompt_index])
    assert torch.equal(both.prompt_embeds[2], b.prompt_embeds[1])
    assert torch.equal(both.prompt_embeds[1], a.prompt_embeds[1])

    sub = both.subset(torch.tensor([4, 0]))
    assert sub.prompts == ["cat", "dog", ""] and sub.source == ["sail", "human"]
    assert torch.equal(sub.win, both.win[[4, 0]]) and torch.equal(sub.label, both.label[[4, 0]])
    assert torch.equal(sub.prompt_embeds[sub.prompt_index], both.prompt_embeds[both.prompt_index[[4, 0]]])
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        LatentPairs.cat([a, _hand_pairs(["z", ""], [0], ["human"], sdxl=True)])


def test_hold_out_splits_every_pair_to_one_side_in_order_by_the_generator():
    pairs = _hand_pairs(["cat", "dog", "bird", ""], [0, 1, 2, 0, 1, 2, 0, 1, 2, 3], ["human"] * 10, seed=0)
    rest, held = pairs.hold_out(3, torch.Generator().manual_seed(5))
    assert (len(rest), len(held)) == (7, 3)
    # Each pair lands on exactly one side, each side in the original order.
    where = [next(i for i in range(10) if torch.equal(pairs.win[i], w)) for w in torch.cat([rest.win, held.win])]
    assert sorted(where) == list(range(10)) and where[:7] == sorted(where[:7]) and where[7:] == sorted(where[7:])
    assert torch.equal(held.prompt_embeds[held.prompt_index], pairs.prompt_embeds[pairs.prompt_index[where[7:]]])
    again = pairs.hold_out(3, torch.Generator().manual_seed(5))[1]
    _assert_same(again, held)
    assert not torch.equal(pairs.hold_out(3, torch.Generator().manual_seed(6))[1].win, held.win)
    for count in (0, 10):
        with pytest.raises(ValueError, match=f"cannot hold out {count} of 10 pairs"):
            pairs.hold_out(count, torch.Generator())


# ----------------------------------------------------------------------------- mixup


def test_mixup_exact_split_every_batch_and_full_coverage():
    sampler = MixupSampler(num_generated=5, num_seed=13, batch_size=8, alpha=0.25, seed=0)
    assert sampler.counts() == (2, 6)
    assert sampler.describe() == "mixup: 2 generated + 6 seed pairs per batch (alpha=0.25 of 8)"
    batches = [sampler.next_batch() for _ in range(20)]
    gen_stream, seed_stream = [], []
    for b in batches:
        assert b.dtype == torch.int64 and b.shape == (8,)
        assert (b[:2] < 5).all() and (b[2:] >= 5).all() and (b[2:] < 18).all()
        gen_stream += b[:2].tolist()
        seed_stream += (b[2:] - 5).tolist()
    # Every pair of a source appears once per pass before any repeats.
    for stream, n in ((gen_stream, 5), (seed_stream, 13)):
        for start in range(0, len(stream) - n + 1, n):
            assert sorted(stream[start : start + n]) == list(range(n))
    # Passes are reshuffled, and the order follows the seed.
    assert seed_stream[:13] != seed_stream[13:26]
    other = MixupSampler(5, 13, 8, 0.25, seed=1)
    assert not all(torch.equal(x, other.next_batch()) for x in batches[:3])


def test_mixup_extremes_and_rounding():
    assert MixupSampler(0, 10, 4, alpha=0.5).counts() == (0, 4)
    assert MixupSampler(10, 10, 4, alpha=0.0).counts() == (0, 4)
    only_gen = MixupSampler(3, 0, 4, alpha=1.0)
    assert only_gen.counts() == (4, 0) and (only_gen.next_batch() < 3).all()
    assert MixupSampler(10, 10, 32, alpha=0.1).counts() == (3, 29)  # round(3.2)
    assert MixupSampler(10, 10, 2, alpha=0.25).counts() == (1, 1)  # 0.5 rounds up
    assert next(iter(MixupSampler(2, 2, 3, alpha=0.5))).shape == (3,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, r"alpha .* must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha .* must be in \[0, 1\]"),
        ({"alpha": math.nan}, r"alpha .* must be in \[0, 1\]"),
        ({"alpha": 1.0, "num_generated": 0}, "num_generated=0"),
        ({"alpha": 0.5, "num_seed": 0}, "num_seed=0.*alpha=1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_mixup_bad_settings_say_what_to_change(kwargs, match):
    args = {"num_generated": 4, "num_seed": 4, "batch_size": 4, "alpha": 0.25, **kwargs}
    with pytest.raises(ValueError, match=match):
        MixupSampler(**args)


def test_mixup_resumes_exactly_mid_epoch(tmp_path):
    sampler = MixupSampler(7, 11, 6, alpha=0.5, seed=4)
    for _ in range(3):  # mid-pass for both sources (9 of 7 and 9 of 11 drawn)
        sampler.next_batch()
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    expected = [sampler.next_batch() for _ in range(10)]

    resumed = MixupSampler(7, 11, 6, alpha=0.5, seed=4)
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt"))
    assert all(torch.equal(e, resumed.next_batch()) for e in expected)

    fresh = MixupSampler(7, 11, 6, alpha=0.5, seed=4)  # without the state it starts over
    assert not all(torch.equal(e, fresh.next_batch()) for e in expected[:3])
    with pytest.raises(ValueError, match="same arguments"):
        MixupSampler(7, 12, 6, alpha=0.5).load_state_dict(torch.load(tmp_path / "sampler.pt"))
