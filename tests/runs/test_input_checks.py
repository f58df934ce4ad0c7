"""Every input checked before any work, in one line naming the option or key and the fix (issue 35).

The table runs each mistake through ``sail_fast.commands.cli.main`` in-process: exit status 2, one error line, no
traceback. No model is trained or loaded, so the whole file takes seconds."""

import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sail_fast.commands.cli import main
from sail_fast.commands.evaluate import read_scores
from sail_fast.data.records import PairRecord, open_image, read_pairs_jsonl, write_pairs_jsonl
from sail_fast.diffusion.prompts import MAX_PROMPT_CHARS, read_prompts
from sail_fast.runs.yaml_files import YamlError, read_yaml

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs" / "toy.yaml")


def one_error_line(argv: list[str], capsys) -> str:
    """Run the command; it must end with exit status 2 and exactly one error line, which is returned."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "override, expected",
    [
        ("sail.rounds=1000000000000", "sail.rounds = 1000000000000: Input should be less than or equal to 1000"),
        (
            "train.pairs_per_step=1000000000000",
            "train.pairs_per_step = 1000000000000: Input should be less than or equal to 65536",
        ),
        (
            "train.micro_batch_pairs=1000000000000",
            "train.micro_batch_pairs = 1000000000000: Input should be less than or equal",
        ),
        ("sail.eval_prompts=-1", "sail.eval_prompts = -1: Input should be greater than or equal to 1"),
        ("toy.labelled_pairs=-5", "toy.labelled_pairs = -5: Input should be greater than or equal to 1"),
        ("toy.seed_fraction=0", "toy.seed_fraction = 0: Input should be greater than 0"),
        ("toy.seed_fraction=1.5", "toy.seed_fraction = 1.5: Input should be less than or equal to 1"),
        ("toy.heldout_pairs=0", "toy.heldout_pairs = 0: Input should be greater than or equal to 1"),
        ("train.learning_rate=1e309", "train.learning_rate = '1e309': Input should be a finite number"),
        ("train.beta=inf", "train.beta = 'inf': Input should be a finite number"),
        ("train.weight_decay=nan", "train.weight_decay = 'nan': Input should be a finite number"),
        ("train.weight_decay=.nan", "train.weight_decay = nan: Input should be a finite number"),
        ("sail.guidance_scale=.inf", "sail.guidance_scale = inf: Input should be a finite number"),
        ("train.adam_betas=[0.9, .nan]", "train.adam_betas.1 = nan: Input should be a finite number"),
        (
            "sail.eval_images_per_prompt=0",
            "sail.eval_images_per_prompt = 0: Input should be greater than or equal to 1",
        ),
        ("sail.generation_batch=0", "sail.generation_batch = 0: Input should be greater than or equal to 1"),
        ("sail.scoring_batch=0", "sail.scoring_batch = 0: Input should be greater than or equal to 1"),
        ("sail.grid_prompts=0", "sail.grid_prompts = 0: Input should be greater than or equal to 1"),
        ("data.resolution=0", "data.resolution = 0: Input should be greater than or equal to 1"),
        ("data.caption_dropout=2", "data.caption_dropout = 2: Input should be less than or equal to 1"),
        ("train.adam_betas=[1.0, 0.999]", "train.adam_betas.0 = 1.0: Input should be less than 1"),
        ("train.adam_betas=[0.9, -0.1]", "train.adam_betas.1 = -0.1: Input should be greater than or equal to 0"),
        ("train.max_grad_norm=0", "train.max_grad_norm = 0: Input should be greater than 0"),
        (
            "sail.reward_timesteps=[0, 2000]",
            "sail.reward_timesteps = [0, 2000]: hi must be <= 1000, the model's training "
            "schedule length (num_train_timesteps)",
        ),
        ("seed=-1", "seed = -1: Input should be greater than or equal to 0"),
    ],
)
def test_config_values_are_refused_at_load_naming_the_key(override, expected, capsys):
    started = time.perf_counter()
    line = one_error_line(["plan", "--config", TOY, "--set", override], capsys)
    assert expected in line and time.perf_counter() - started < 10


def test_a_round_override_is_checked_too(capsys):
    line = one_error_line(
        ["plan", "--config", TOY, "--set", "sail.round_overrides={2: ['sail.reward_timesteps=[0, 5000]']}"], capsys
    )
    assert "sail.round_overrides[2]" in line and "hi must be <= 1000" in line


# --------------------------------------------------------------------------- command-line arguments
EVAL = ["eval", "--checkpoint", "c", "--prompts", "p.txt", "--metrics", "toy_oracle", "--out", "o"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["label", "p.jsonl", "--out", "o.jsonl", "--metric", "toy_oracle", "--range", "5", "-5"],
            "--range: LO must be below HI (the metric's lowest and highest score), got 5 -5",
        ),
        (
            ["label", "p.jsonl", "--out", "o.jsonl", "--temperature", "0"],
            "argument --temperature: must be a number > 0, got '0'",
        ),
        (
            ["label", "p.jsonl", "--out", "o.jsonl", "--batch-size", "0"],
            "argument --batch-size: must be an integer >= 1, got '0'",
        ),
        (["toy", "pretrain", "--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["toy", "pretrain", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
        (["check", "--rows", "0"], "argument --rows: must be an integer >= 1, got '0'"),
        (["check", "--latent", "4", "0", "64"], "argument --latent: must be an integer >= 1, got '0'"),
        (
            [*EVAL, "--limit", "-1"],
            "argument --limit: must be an integer >= 1, got '-1'",
        ),
        (
            [*EVAL, "--limit", "0"],
            "argument --limit: must be an integer >= 1, got '0'",
        ),
        (
            [*EVAL, "--batch-size", "0"],
            "argument --batch-size: must be an integer >= 1, got '0'",
        ),
        (
            [*EVAL, "--guidance-scale", "inf"],
            "argument --guidance-scale: must be a finite number, got 'inf'",
        ),
        (
            ["generate", "--checkpoint", "c", "--prompts", "p.txt", "--out", "o", "--guidance-scale", "nan"],
            "argument --guidance-scale: must be a finite number, got 'nan'",
        ),
        (
            ["generate", "--checkpoint", "c", "--prompts", "p.txt", "--out", "o", "--seed", "-1"],
            "argument --seed: must be an integer in [0, 2**63), got '-1'",
        ),
        (
            ["generate", "--checkpoint", "c", "--prompts", "p.txt", "--out", "o", "--num-images", "x"],
            "argument --num-images: must be an integer, got 'x'",
        ),
        (["plan", "--config", TOY, "--gpu-memory", "nan"], "argument --gpu-memory: must be a finite number, got 'nan'"),
        (["toy", "experiment", "--seeds", "0", "-3"], "argument --seeds: must be an integer in [0, 2**63), got '-3'"),
    ],
)
def test_bad_arguments_end_in_one_line_naming_the_option(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths in the table land here, should anything be written
    line = one_error_line(argv, capsys)
    assert expected in line
    assert not any(tmp_path.iterdir())  # refused before any work


def test_an_argument_error_is_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["check", "--rows", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage:" not in err
    assert err.splitlines() == [
        "sail-fast check: error: argument --rows: must be an integer >= 1, got '0'",
        "(run sail-fast check --help for the options)",
    ]


# --------------------------------------------------------------------------- YAML
def _alias_bomb(path: Path, levels: int = 9) -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    path.write_text("\n".join(lines) + f"\nmodel:\n  toy: true\ntrain: *a{levels - 1}\n")
    return path


def test_a_yaml_alias_bomb_is_refused_in_a_second(tmp_path, capsys):
    bomb = _alias_bomb(tmp_path / "bomb.yaml")
    started = time.perf_counter()
    with pytest.raises(YamlError, match=r"bomb.yaml: its aliases \(\*name\) expand to more than 100,000 values"):
        read_yaml(bomb)
    assert time.perf_counter() - started < 1
    line = one_error_line(["plan", "--config", str(bomb)], capsys)
    assert f"{bomb}: its aliases (*name) expand to more than 100,000 values" in line
    assert time.perf_counter() - started < 5


def test_a_self_referring_alias_is_refused_and_small_aliases_still_read(tmp_path):
    (tmp_path / "loop.yaml").write_text("model: &m\n  toy: true\n  more: [*m]\n")
    with pytest.raises(YamlError, match="or refer to themselves"):
        read_yaml(tmp_path / "loop.yaml")
    (tmp_path / "ok.yaml").write_text("base: &b {steps: 3}\ntrain: *b\nother: [*b, *b]\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"base": {"steps": 3}, "train": {"steps": 3}, "other": [{"steps": 3}] * 2}


# --------------------------------------------------------------------------- prompt files
def test_a_prompt_file_with_a_huge_line_is_refused_fast(tmp_path, capsys):
    big = tmp_path / "big.txt"
    big.write_text("a" * 10_000_000 + "\n")
    started = time.perf_counter()
    with pytest.raises(
        ValueError, match=rf"big.txt: prompt 1 has 10,000,000 characters, over the limit of {MAX_PROMPT_CHARS:,}"
    ):
        read_prompts(big)
    line = one_error_line(
        ["eval", "--checkpoint", "c", "--prompts", str(big), "--metrics", "toy_oracle", "--out", str(tmp_path / "out")],
        capsys,
    )
    assert f"{big}: prompt 1 has 10,000,000 characters" in line and time.perf_counter() - started < 5


def test_a_prompt_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import sail_fast.diffusion.prompts as prompts

    monkeypatch.setattr(prompts, "MAX_PROMPT_FILE_BYTES", 2**20)
    big = tmp_path / "many.txt"
    big.write_text("a cat\n" * 200_000)  # 1.2 MB
    with pytest.raises(ValueError, match=r"many.txt: 1 MB, over the 1 MB limit for a prompt file"):
        read_prompts(big)


# --------------------------------------------------------------------------- images
def _png(pixels: np.ndarray, color_type: int, depth: int = 16, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour), or just its header for a stated ``size``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = size or pixels.shape[:2]
    rows = b"" if size else b"".join(b"\0" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in pixels)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_a_16_bit_png_is_scaled_to_8_bits_not_saturated(tmp_path):
    grey = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    (tmp_path / "grey16.png").write_bytes(_png(grey, color_type=0))
    img = open_image(tmp_path / "grey16.png", "pairs.jsonl:1", "win")
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 64], [128, 255]]
    rgb = np.stack([grey, grey // 2, 65535 - grey], axis=-1)
    (tmp_path / "rgb16.png").write_bytes(_png(rgb, color_type=2))
    assert np.asarray(open_image(tmp_path / "rgb16.png", "x", "win"))[1, 0].tolist() == [128, 64, 127]


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.fromarray(np.array([[0, 32768]], dtype=np.int32)), [[0, 128]]),  # 32-bit grey: older Pillow's 16-bit PNG
        (Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)), [[0, 128]]),  # float grey in [0, 1]
        (Image.new("LA", (2, 1), (40, 0)), [[255, 255]]),  # fully transparent: the white it is shown on
        (Image.new("LA", (2, 1), (40, 255)), [[40, 40]]),
        (Image.new("RGBA", (2, 1), (10, 20, 30, 255)), [[[10, 20, 30]] * 2]),
        (Image.new("RGBA", (2, 1), (10, 20, 30, 0)), [[[255, 255, 255]] * 2]),
        (Image.new("1", (2, 1), 1), [[255, 255]]),
    ],
)
def test_every_pixel_mode_becomes_8_bit_grey_or_rgb(image, expected):
    img = open_image(image, "x", "win")
    assert img.mode in ("L", "RGB") and np.asarray(img).tolist() == expected


def test_a_palette_image_keeps_its_colours_and_lays_transparency_on_white():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    assert np.asarray(open_image(img, "x", "win")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    img.info["transparency"] = 0
    assert np.asarray(open_image(img, "x", "win")).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_float_pixels_outside_0_1_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(
        ValueError,
        match=r"pairs.jsonl:3: could not decode the lose image \(file .*f.tiff'\): F \(float\) "
        r"grey values span \[200, 200\], outside \[0, 1\]",
    ):
        open_image(tmp_path / "f.tiff", "pairs.jsonl:3", "lose")


def test_written_pairs_keep_16_bit_pictures_as_8_bit_pngs(tmp_path):
    grey16 = Image.open(io.BytesIO(_png(np.full((2, 2), 257 * 100, dtype=np.uint16), color_type=0)))
    write_pairs_jsonl(tmp_path / "pairs.jsonl", [PairRecord("a 1", grey16, Image.new("L", (2, 2), 0))])
    record = read_pairs_jsonl(tmp_path / "pairs.jsonl")[0][0]
    assert np.asarray(Image.open(record.win)).tolist() == [[100, 100], [100, 100]]


@pytest.mark.parametrize("side", [12_000, 20_000])  # Pillow warns above 89M pixels and raises above twice that
def test_a_decompression_bomb_is_one_line_naming_the_file_and_the_limit(tmp_path, side, capsys):
    (tmp_path / "bomb.png").write_bytes(_png(np.zeros((1, 1)), color_type=0, depth=8, size=(side, side)))
    (tmp_path / "ok.png").write_bytes(_png(np.zeros((2, 2)), color_type=0, depth=8))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a 1", "win": "bomb.png", "lose": "ok.png"}) + "\n")
    with pytest.raises(
        ValueError,
        match=r"pairs.jsonl:1: the win image \(file .*bomb.png'\) has more than 89,478,485 "
        r"pixels, Pillow's limit against decompression bombs",
    ):
        open_image(tmp_path / "bomb.png", f"{tmp_path / 'pairs.jsonl'}:1", "win")
    line = one_error_line(
        [
            "label",
            str(tmp_path / "pairs.jsonl"),
            "--metric",
            "toy_oracle",
            "--range",
            "-5",
            "5",
            "--out",
            str(tmp_path / "labelled.jsonl"),
        ],
        capsys,
    )
    assert "bomb.png" in line and "has more than 89,478,485 pixels" in line
    assert not (tmp_path / "labelled.jsonl").exists()


# --------------------------------------------------------------------------- eval's stored scores
def test_a_scores_file_missing_a_key_is_named(tmp_path):
    file = tmp_path / "scores" / "iter0.json"
    file.parent.mkdir()
    file.write_text(json.dumps({"checkpoint": "c", "settings": {}, "scores": {}}))
    with pytest.raises(
        ValueError,
        match=r"iter0.json: a scores file needs the keys checkpoint, settings, sampling, scores, "
        r"missing sampling; delete it to score that checkpoint again",
    ):
        read_scores(file)
    file.write_text('{"checkpoint": ')
    with pytest.raises(ValueError, match=r"iter0.json: not valid JSON"):
        read_scores(file)
