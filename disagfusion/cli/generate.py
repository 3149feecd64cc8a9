"""`disagfusion generate`: images (or, with --video, a video) through a server, or the
in-process baseline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from disagfusion.cli.common import (
    DEFAULT_MODEL,
    HELP,
    require_extra,
)


def register(sub: Any) -> None:
    """Add `generate` to the `disagfusion` parser."""
    gen = sub.add_parser(
        "generate",
        help="generate images (or --video) through a server, or in-process",
        formatter_class=HELP,
    )
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="file to write (default out.png, with --video out.mp4; with -n > 1:"
        " NAME-0.png, NAME-1.png, ...)",
    )
    gen.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the gateway (a trailing /v1, as OpenAI clients use, is fine)",
    )
    gen.add_argument(
        "--api-key",
        default=None,
        help="bearer key (default: $DISAGFUSION_API_KEY, then $OPENAI_API_KEY)",
    )
    gen.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    gen.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's)"
    )
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    gen.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the model's)"
    )
    gen.add_argument("--negative-prompt", default=None, help="what not to draw")
    gen.add_argument("-n", type=int, default=1, help="images to generate")
    gen.add_argument(
        "--in-process",
        action="store_true",
        help="run the whole diffusers pipeline in this process (the baseline)",
    )
    gen.add_argument(
        "--model",
        default=None,
        help="model id to ask the server for; with --in-process the model to load"
        f" (default {DEFAULT_MODEL})",
    )
    gen.add_argument(
        "--video",
        action="store_true",
        help="a video through the Videos API (a job: polled with a progress bar), as MP4",
    )
    gen.add_argument(
        "--frames", type=int, default=None, help="--video: frames (default: the model's)"
    )
    gen.add_argument("--fps", type=int, default=None, help="--video: frame rate (default: 16)")
    gen.add_argument(
        "--image", type=Path, default=None, help="--video: the reference image (image-to-video)"
    )
    gen.set_defaults(func=_cmd_generate)


def _api_key(args: argparse.Namespace) -> str | None:
    return (
        args.api_key
        or os.environ.get("DISAGFUSION_API_KEY")
        or os.environ.get("OPENAI_API_KEY")
        or None
    )


def _cmd_video(args: argparse.Namespace) -> int:
    from disagfusion.worker.gateway.video_client import (
        generate_video_in_process,
        generate_video_remote,
        progress_bar,
    )

    output = args.output or Path("out.mp4")
    problem = _unwritable(output)
    if args.image is not None and not args.image.is_file():
        problem = f"--image {args.image}: no such file"
    elif args.n != 1:
        problem = "--video makes one video: drop -n"
    if problem:
        print(
            f"error: {problem if problem.startswith('-') else f'-o {output}: {problem}'}",
            file=sys.stderr,
        )
        return 2
    fields = {"prompt": args.prompt}
    for key, value in (
        ("seed", args.seed),
        ("num_inference_steps", args.steps),
        ("size", args.size),
        ("guidance_scale", args.guidance),
        ("negative_prompt", args.negative_prompt),
        ("num_frames", args.frames),
        ("fps", args.fps),
    ):
        if value is not None:
            fields[key] = str(value)
    if args.in_process:
        require_extra("worker")
        mp4 = generate_video_in_process(args.model or DEFAULT_MODEL, fields, args.image)
    else:
        if args.model:
            fields["model"] = args.model
        mp4 = generate_video_remote(
            args.url, fields, args.image, api_key=_api_key(args), progress=progress_bar()
        )
    output.write_bytes(mp4)
    print(output)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from disagfusion.worker.gateway.client import generate_in_process, generate_remote

    if args.video:
        return _cmd_video(args)
    for flag in ("frames", "fps", "image"):
        if getattr(args, flag) is not None:
            print(f"error: --{flag} needs --video", file=sys.stderr)
            return 2
    args.output = args.output or Path("out.png")

    body: dict[str, object] = {"prompt": args.prompt, "n": args.n}
    for key, value in (
        ("seed", args.seed),
        ("num_inference_steps", args.steps),
        ("size", args.size),
        ("guidance_scale", args.guidance),
        ("negative_prompt", args.negative_prompt),
    ):
        if value is not None:
            body[key] = value
    problem = _unwritable(args.output)
    if problem:  # say so before spending minutes on the images
        print(f"error: -o {args.output}: {problem}", file=sys.stderr)
        return 2
    if args.in_process:
        require_extra("worker")
        pngs = generate_in_process(args.model or DEFAULT_MODEL, body)
    else:
        if args.model:
            body["model"] = args.model
        pngs = generate_remote(args.url, body, api_key=_api_key(args))
    for path in _output_paths(args.output, len(pngs)):
        path.write_bytes(pngs.pop(0))
        print(path)
    return 0


def _unwritable(output: Path) -> str:
    """Why `output` cannot be written, or ""."""
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        return "is a directory; name a file, e.g. out.png"
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return ""


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]
