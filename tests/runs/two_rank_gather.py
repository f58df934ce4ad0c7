"""One rank of tests/runs/test_gather.py: python two_rank_gather.py RANK PORT OUT. Gathers tensors, a LatentPairs and a
tuple over a two-process gloo group and saves what it received (and what went through pickling) to OUT."""

import sys

import torch
import torch.distributed as dist

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.runs.distributed import DistInfo


def rank_pairs(rank: int) -> LatentPairs:
    """Rank 0 holds 3 pairs over 2 prompts, rank 1 holds 1 pair over 1 prompt (different lengths on purpose)."""
    g = torch.Generator().manual_seed(rank)
    m, prompts = (3, ["a cat", "a dog", ""]) if rank == 0 else (1, ["a fox", ""])
    return LatentPairs(
        win=torch.randn(m, 4, 5, 3, generator=g),
        lose=torch.randn(m, 4, 5, 3, generator=g),
        prompt_index=torch.tensor([0, 1, 0][:m]),
        prompts=prompts,
        prompt_embeds=torch.randn(len(prompts), 7, 8, generator=g).to(torch.bfloat16),
        pooled_prompt_embeds=None,
        time_ids_win=None,
        time_ids_lose=None,
        label=torch.rand(m, generator=g),
        source=["sail"] * m,
    )


def main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    pickled = []
    plain = dist.all_gather_object

    def spy(output, obj, *args, **kwargs):
        pickled.append(obj)
        return plain(output, obj, *args, **kwargs)

    dist.all_gather_object = spy
    info = DistInfo(rank, 2)
    rows = 3 if rank == 0 else 0  # rank 1 has nothing to give
    tensors = {
        "float32": torch.randn(rows, 2, 3, generator=torch.Generator().manual_seed(10 + rank)),
        "bfloat16": torch.randn(rows, 5, generator=torch.Generator().manual_seed(20 + rank)).to(torch.bfloat16),
        "float16": torch.randn(rows + rank * 4, generator=torch.Generator().manual_seed(30 + rank)).half(),
        "bool": torch.arange(rows * 2).reshape(rows, 2) % 3 == rank,
        "int64": torch.arange(rows) + 1000 * rank,
    }
    gathered = {name: info.gather_tensors(t) for name, t in tensors.items()}
    pairs = info.gather((rank_pairs(rank), [f"prompt {rank}"] * (2 - rank), torch.tensor([rank, rank + 0.5])))
    try:
        info.gather_tensors(torch.zeros(2, 3 + rank))
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    torch.save(
        {
            "sent": tensors,
            "gathered": gathered,
            "pairs": [vars(p[0]) for p in pairs],
            "prompts": [p[1] for p in pairs],
            "rewards": [p[2] for p in pairs],
            "pickled": [
                repr(type(o)) + ":" + ",".join(sorted({type(x).__name__ for x in o}))
                if isinstance(o, list)
                else repr(type(o))
                for o in pickled
            ],
            "mismatch": mismatch,
        },
        out,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
