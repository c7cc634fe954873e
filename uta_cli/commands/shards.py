"""`uta shards`: an image folder, a CSV/TSV list or tar shards as pre-resized webdataset
shards in CLIP_benchmark's layout."""

from __future__ import annotations

import shlex

import typer

from uta_cli.commands._common import cli_errors


def shards(
    src: str = typer.Argument(..., help="An image folder (class folders, or train/ val/ test/ "
                              "of class folders; local or fsspec), a .csv/.tsv of image paths "
                              "with captions and/or labels, or tar shards."),
    out: str = typer.Argument(..., help="The output folder (local)."),
    short_side: int = typer.Option(0, "--short-side", help="Resize so the short side is this "
                                   "many pixels (never upscaling); 0 keeps the size."),
    max_side: int = typer.Option(0, "--max-side", help="Or: resize so the long side is at most "
                                 "this."),
    quality: int = typer.Option(95, "--quality", help="JPEG quality of re-encoded images (an "
                                "RGB JPEG that needs no resize keeps its bytes)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    workers: int = typer.Option(1, "--workers", help="Processes writing shards."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Write the samples in a seeded "
                                 "permutation, so every shard mixes classes."),
    seed: int = typer.Option(0, "--seed", help="The permutation's seed."),
    split: str = typer.Option("train", "--split", help="The split of a source without split "
                              "folders."),
    classnames: str = typer.Option("", "--classnames", help="A file of class names, one per "
                                   "line in label order (for tar shards or lists with integer "
                                   "labels)."),
) -> None:
    """Write SRC as webdataset tar shards in CLIP_benchmark's layout: OUT/<split>/0.tar ..
    N-1.tar with nshards.txt, OUT/classnames.txt, and OUT/manifest.json (counts per split and
    class, the source, the options, this command). Each sample is KEY.jpg plus KEY.cls (label)
    and/or KEY.txt (caption).

    Images stored at a short side of 256 px feed each loader worker 1.4-1.8x more images per
    second than ImageNet-size originals and 2.5-3x more than 1024x768 ones (benchmarks/data.py).
    uta pretrain and uta finetune read OUT/<split> as data.source (the sample count comes from
    the manifest); uta zeroshot reads --dataset OUT --split val, or OUT/val. A rerun of the same
    command resumes (finished shards are kept); other options are refused. Unreadable images
    are skipped and counted.

    Examples:

      uta shards /data/imagenet out/imagenet-256 --short-side 256 --shuffle --workers 16

      uta shards pairs.tsv out/pairs --max-side 512 --shard-size 5000 --workers 8

      uta shards "s3://bucket/raw-{0000..0099}.tar" out/raw-384 --short-side 384

      uta pretrain vitb16 --set data.source=out/imagenet-256/train
    """
    with cli_errors():
        from rich.console import Console

        from uta_cli.workflows.shards import ShardOptions, make_shards, summary_lines

        opts = ShardOptions(short_side=short_side, max_side=max_side, quality=quality,
                            shard_size=shard_size, shuffle=shuffle, seed=seed, split=split,
                            classnames=classnames)
        # the command as given, rebuilt from the parsed options (sys.argv is another
        # program's when called in-process)
        given = {"--short-side": short_side, "--max-side": max_side, "--quality": quality,
                 "--shard-size": shard_size, "--workers": workers, "--shuffle": shuffle,
                 "--seed": seed, "--split": split, "--classnames": classnames}
        defaults = {"--quality": 95, "--shard-size": 1000, "--workers": 1, "--split": "train"}
        words = ["uta", "shards", src, out]
        for flag, value in given.items():
            if value not in (0, False, "") and value != defaults.get(flag):
                words += [flag] if value is True else [flag, str(value)]
        command = " ".join(shlex.quote(w) for w in words)
        manifest = make_shards(src, out, opts, workers=workers, command=command,
                               console=Console(stderr=True))
        for line in summary_lines(manifest, out.rstrip("/")):
            typer.echo(line)
