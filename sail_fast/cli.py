"""The ``sail-fast`` command line."""

from __future__ import annotations

import argparse
import time

import torch


def _check(args: argparse.Namespace) -> None:
    """Run paired_mse on SD-shaped rows through every backend this machine has."""
    from sail_fast.kernels import paired_mse, paired_mse_reference, resolve_backend

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    shape = (args.rows, *args.latent)
    gen = torch.Generator().manual_seed(0)
    target, policy, ref = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    expect = paired_mse_reference(target, policy, ref)
    backends = ["torch", "compiled"]
    if resolve_backend(device) == "triton":
        backends.insert(0, "triton")
    bytes_read = 3 * target.numel() * target.element_size()
    print(f"paired_mse on {device}, rows {list(shape)}, {args.dtype}; {bytes_read / 1e6:.1f} MB read per call")
    for backend in backends:
        out = paired_mse(target, policy, ref, backend=backend)  # warm-up (and compile)
        err = max((a - b).abs().max().item() for a, b in zip(out, expect))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            paired_mse(target, policy, ref, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        print(f"  {backend:9s} max |diff| vs reference {err:.2e}   {seconds * 1e3:8.2f} ms   {bytes_read / seconds / 1e9:6.1f} GB/s")


def _train(args: argparse.Namespace) -> None:
    from sail_fast.train import main as train_main

    train_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sail-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check and time the fused paired_mse kernel on SD-shaped latents")
    check.add_argument("--rows", type=int, default=80, help="rows: candidates x draws (default 8 x 10)")
    check.add_argument("--latent", type=int, nargs=3, default=[4, 64, 64], metavar=("C", "H", "W"))
    check.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    check.add_argument("--repeats", type=int, default=10)
    check.set_defaults(func=_check)
    train = sub.add_parser("train", add_help=False, help="Diffusion-DPO training; same flags as sail_fast/train.py")
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
