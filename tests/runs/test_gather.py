"""DistInfo.gather over two real gloo ranks: tensors of any dtype and row count arrive bit for bit, in rank order,
without going through pickling; a LatentPairs arrives field by field; mismatched shapes are a clear error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port  # noqa: E402
from two_rank_gather import rank_pairs  # noqa: E402

WORKER = Path(__file__).parent / "two_rank_gather.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(port), str(out / f"rank{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_tensors_arrive_bit_for_bit_in_rank_order_whatever_their_dtype_and_length(results):
    for name in ("float32", "bfloat16", "float16", "bool", "int64"):
        sent = [results[r]["sent"][name] for r in (0, 1)]
        assert len(sent[0]) != len(sent[1])  # the ranks hold different numbers of rows
        for r in (0, 1):
            got = results[r]["gathered"][name]
            assert len(got) == 2
            for k in (0, 1):
                assert got[k].dtype == sent[k].dtype and got[k].shape == sent[k].shape, (name, r, k)
                assert torch.equal(got[k], sent[k]), (name, r, k)
    assert results[0]["gathered"]["float32"][1].shape == (0, 2, 3)  # an empty rank stays an empty, well-shaped part


def test_latent_pairs_arrive_field_by_field_and_only_strings_are_pickled(results):
    for r in (0, 1):
        assert results[r]["prompts"] == [["prompt 0", "prompt 0"], ["prompt 1"]]
        assert [t.tolist() for t in results[r]["rewards"]] == [[0.0, 0.5], [1.0, 1.5]]
        for k in (0, 1):
            want, got = vars(rank_pairs(k)), results[r]["pairs"][k]
            assert got["prompts"] == want["prompts"] and got["source"] == want["source"]
            for name in ("win", "lose", "prompt_index", "prompt_embeds", "label"):
                assert torch.equal(got[name], want[name]), (r, k, name)
            assert got["pooled_prompt_embeds"] is None and got["time_ids_win"] is None
        pickled = results[r]["pickled"]
        assert pickled and not any("Tensor" in p for p in pickled), pickled
        assert all(p.endswith(":str") or p.endswith(":") or "NoneType" in p for p in pickled), pickled


def test_mismatched_shapes_are_a_clear_error_on_every_rank(results):
    for r in (0, 1):
        assert "differ beyond dim 0" in results[r]["mismatch"] and "(2, 3)" in results[r]["mismatch"]
