"""Nothing silently wrong, read back: every file a run or a command reads again (candidates, pairs, rankings,
stage records, scores, weights without their manifest) is checked the way weights are, and damage ends the
command in one line naming the file and what to do (issue 35)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from sail_fast.commands.cli import main
from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.build import build_stack
from sail_fast.runs.config import load_config
from sail_fast.runs.readback import DIGEST_KEY, DamagedFileError, check_run_weights, read_json_file
from sail_fast.sail.loop import SailLoop

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_config, make_overrides  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402
from test_weights_folders_and_signals import WEIGHTS, one_error_line, zero_tensor_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished SAIL run with one round, on the tiny stack (under a minute); tests damage copies of it."""
    tmp_path = tmp_path_factory.mktemp("finished")
    SailLoop(make_config(tmp_path, "sail.rounds=1", "sail.select=last")).run()  # keeps round 1, whatever its score
    return tmp_path


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def resume_argv(finished: Path, run: Path) -> list[str]:
    """``sail-fast run --resume`` of a copied run, with the config it started with (its data stays in place)."""
    sets = [
        word
        for item in make_overrides(finished, "sail.rounds=1", "sail.select=last", f"output_dir={run}")
        for word in ("--set", item)
    ]
    return ["run", "--config", str(TINY), *sets, "--resume"]


def error_line(argv: list[str], capsys) -> str:
    """The one line a command ends with (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    return one_error_line(capsys.readouterr().err)


def zero_file(file: Path) -> None:
    file.write_bytes(bytes(file.stat().st_size))


def without_digest(file: Path) -> None:
    """The same file written without its sha256 header entry (by an older sail-fast, or with an edited header)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != DIGEST_KEY}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(file), metadata=metadata)


# -------------------------------------------------------------- a round's candidates, read back on resume
@pytest.mark.parametrize(
    "damage, reason",
    [
        (zero_file, "is damaged (Error while deserializing header"),
        (zero_tensor_bytes, "is damaged (its contents do not match the sha256"),
        (without_digest, "carries no sha256 of its contents"),
    ],
)
def test_damaged_candidates_are_named_on_resume(tmp_path, finished, capsys, damage, reason):
    run = copy_run(finished, tmp_path)
    (run / "round-01/done.json").unlink()  # as if killed after sampling: a resume reads the candidates back
    candidates = run / "round-01/candidates.rank0.safetensors"
    damage(candidates)
    line = error_line(resume_argv(finished, run), capsys)
    assert f"{candidates} {reason}" in line
    assert line.endswith(f"delete {run / 'round-01'}/ and rerun with --resume to sample it again")


# ---------------------------------------------------------- finished stages' records, read before any work
@pytest.mark.parametrize(
    "name", ["round-01/ranking.json", "round-01/eval.json", "round-01/done.json", "base/eval.json", "iter0/done.json"]
)
def test_a_damaged_stage_record_is_named_on_resume(tmp_path, finished, capsys, name):
    run = copy_run(finished, tmp_path)
    zero_file(run / name)
    line = error_line(resume_argv(finished, run), capsys)
    stage = run / name.split("/")[0]
    assert f"{run / name}: not valid JSON (Expecting value: line 1 column 1" in line
    assert line.endswith(f"delete {stage}/ and rerun with --resume to run that stage again")


def test_a_damaged_soup_record_is_named_on_resume(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    record = run / "soup-00-01/eval.json"  # a soup stage (sail.soup), its record damaged
    record.parent.mkdir()
    record.write_text("{")
    line = error_line(resume_argv(finished, run), capsys)
    assert f"{record}: not valid JSON (" in line
    assert line.endswith(f"delete {run / 'soup-00-01'}/ and rerun with --resume to run that stage again")


def test_damaged_eval_samples_are_named_on_resume(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    samples = run / "base/eval_samples.safetensors"  # the tiny world has no judge: stand in for the toy's
    samples.write_bytes(b"\0" * 64)
    line = error_line(resume_argv(finished, run), capsys)
    assert f"{samples} is damaged (" in line and line.endswith(
        f"delete {run / 'base'}/ and rerun with --resume to run that stage again"
    )


def test_read_json_file_names_a_truncated_file_and_what_to_do(tmp_path):
    file = tmp_path / "scores.json"
    file.write_text('{"scores": "abc')
    with pytest.raises(DamagedFileError, match=r"scores.json: not valid JSON \(Unterminated string .*\); delete it"):
        read_json_file(file, "delete it")
    file.write_text('{"a": 1}')
    assert read_json_file(file) == {"a": 1}


# -------------------------------------------------------------------------- pairs: shards and the cache
def test_a_rounds_damaged_pair_shard_is_named(tmp_path, finished):
    shard = tmp_path / "pairs.safetensors"
    shutil.copy(finished / "run/round-01/pairs.safetensors", shard)
    assert len(LatentPairs.load(shard)) == 4
    zero_tensor_bytes(shard)
    with pytest.raises(
        DamagedFileError, match=f"{shard} is damaged \\(its contents do not match the sha256 .*\\); write it again"
    ):
        LatentPairs.load(shard)
    zero_file(shard)
    with pytest.raises(DamagedFileError, match=f"{shard} is damaged \\(Error while deserializing header"):
        LatentPairs.load(shard)


def test_a_damaged_encode_cache_is_named(tmp_path):
    from sail_fast.data.records import PairRecord, write_pairs_jsonl
    from sail_fast.data.sources import load_pairs
    from sail_fast.diffusion.tiny import tiny_stack

    def image(seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8), "L")

    write_pairs_jsonl(
        tmp_path / "pairs.jsonl", [PairRecord("a 1", image(0), image(1)), PairRecord("a 2", image(2), image(3))]
    )
    config = load_config(overrides=["model.tiny=sd15", "data.resolution=8"])
    kw = dict(model=config.model, data=config.data, cache_dir=tmp_path / "cache", log=lambda *_: None)
    stack = tiny_stack("sd15", sample_size=8, in_channels=1)
    load_pairs([str(tmp_path / "pairs.jsonl")], stack, **kw)
    cache = next((tmp_path / "cache").glob("pairs-*.safetensors"))
    zero_tensor_bytes(cache)  # the header (and so its name in the cache key) intact, the latents zero
    with pytest.raises(
        DamagedFileError, match=f"{cache} is damaged .*; delete it and rerun: the pairs are encoded again"
    ):
        load_pairs([str(tmp_path / "pairs.jsonl")], stack, **kw)


def test_a_shard_written_before_shards_carried_a_sha256_is_still_read(tmp_path):
    stack = build_stack(load_config(TINY).model)
    shard = planted_pairs(stack, 4, 0).save(tmp_path / "old.safetensors")
    without_digest(shard)
    assert len(LatentPairs.load(shard)) == 4


# ------------------------------------------------------------------ weights whose manifest is gone
def test_weights_changed_after_their_manifest_was_deleted_are_refused(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    final = run / "round-01/train/final"
    (final / "manifest.json").unlink()
    zero_tensor_bytes(final / WEIGHTS)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    expected = f"{final / 'unet'} has no manifest.json (nor has {final}), so its weights cannot be checked"
    for argv in (
        ["generate", "--checkpoint", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "g")],
        ["export", str(run), str(tmp_path / "x")],
        resume_argv(finished, run),
    ):
        assert expected in error_line(argv, capsys), argv
    assert not list(tmp_path.glob("g/*.png")) and not list(tmp_path.glob("x/*.safetensors"))


def test_a_diffusers_folder_outside_any_run_stays_unchecked():
    check_run_weights(REPO / "sail_fast/toy_model/unet")  # no manifest, no run above it: loaded as it is


# --------------------------------------------------------------- eval: every checkpoint before any sampling
def test_eval_refuses_a_damaged_second_checkpoint_before_sampling_the_first(tmp_path, finished, capsys, monkeypatch):
    run = copy_run(finished, tmp_path)
    zero_tensor_bytes(run / "round-01/train/final" / WEIGHTS)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")

    def sampled(checkpoint, *args, **kwargs):
        raise AssertionError(f"{checkpoint} was sampled before every checkpoint was checked")

    monkeypatch.setattr("sail_fast.commands.evaluate.score_checkpoint", sampled)
    line = error_line(
        [
            "eval",
            "--checkpoint",
            str(run / "iter0/final/unet"),
            "--checkpoint",
            str(run),
            "--prompts",
            str(prompts),
            "--metrics",
            "toy_oracle",
            "--out",
            str(tmp_path / "e"),
        ],
        capsys,
    )
    assert f"{run / 'round-01/train/final' / WEIGHTS} does not match the sha256" in line
    assert not (tmp_path / "e").exists()
