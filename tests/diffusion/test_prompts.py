import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sail_fast.diffusion.prompts import read_prompts


def test_every_format_reads_the_same_prompts(tmp_path):
    prompts = ["a red cube", "two cats", "a handwritten 7"]
    (tmp_path / "p.txt").write_text("a red cube\n\n  two cats  \na handwritten 7\n")
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\n" + "".join(f"{p}\tx\n" for p in prompts))
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": p, "metadata": {}} for p in prompts]))
    (tmp_path / "s.json").write_text(json.dumps(prompts))
    pq.write_table(pa.table({"caption": prompts}), tmp_path / "p.parquet")
    for name in ("p.txt", "p.tsv", "p.json", "s.json", "p.parquet"):
        assert read_prompts(tmp_path / name) == prompts, name


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.tsv", "prompt\tCategory\nx\ty\n", "needs a 'Prompt' column"),
        ("p.json", '{"prompt": "x"}', "must hold a list"),
        ("p.json", '[{"text": "x"}]', "entry 0"),
        ("p.csv", "x\n", "unknown prompt file type"),
        ("p.txt", "\n\n", "no prompts found"),
    ],
)
def test_bad_prompt_files_say_what_is_wrong(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(tmp_path / name)


def test_missing_prompt_file_lists_the_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.txt.*\.tsv.*\.json.*\.parquet"):
        read_prompts(tmp_path / "nope.txt")
