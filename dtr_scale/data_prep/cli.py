"""`dtr-prep`: prepare latent shards from images, merge parts, prepare the embedded digits, verify checksums.

    dtr-prep images /data/imagenet/train data/imagenet256 --workers 8           # one machine, merged at the end
    sbatch --array=0-31 --wrap "dtr-prep images /data/imagenet/train data/in256 --workers 8"
    dtr-prep merge data/in256                                                    # after the array job
    dtr-prep digits data/digits
In an array job the part comes from SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) and the number of
parts from SLURM_ARRAY_TASK_COUNT, unless --part/--num-parts are given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dtr_scale.data_prep.images import DEFAULT_MAX_PIXELS
from dtr_scale.data_prep.layout import PrepError
from dtr_scale.data.shard_format import FORMATS, ShardDataError, read_manifest


def slurm_part(environ: dict[str, str]) -> tuple[int, int] | None:
    """(part, num_parts) of this task of a SLURM array job, or None outside one."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"])


def resolve_part(part: int | None, num_parts: int | None, environ: dict[str, str]) -> tuple[int, int]:
    if part is not None or num_parts is not None:
        if part is None or num_parts is None:
            raise PrepError("give both --part and --num-parts (or neither, to use the SLURM array task)")
        return part, num_parts
    return slurm_part(environ) or (0, 1)


def read_class_list(path: str | None) -> list[str] | None:
    if path is None:
        return None
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_images(args: argparse.Namespace) -> None:
    from dtr_scale.models.autoencoders import load_autoencoder
    from dtr_scale.data_prep.layout import check_output_dir
    from dtr_scale.data_prep.merge import merge
    from dtr_scale.data_prep.prepare import PrepSettings, prepare
    from dtr_scale.data_prep.sources import FolderSource

    part, num_parts = resolve_part(args.part, args.num_parts, dict(os.environ))
    settings = PrepSettings(format=args.format, resolution=args.resolution, dtype=args.dtype,
                            shard_size=args.shard_size, max_pixels=args.max_pixels)
    check_output_dir(args.out)  # before the (long) listing of the source
    source = FolderSource(args.src, classes=read_class_list(args.classes), max_pixels=args.max_pixels)
    autoencoder = load_autoencoder(args.autoencoder, weights=args.vae_weights, device=_device(args.device),
                                   autocast=args.autocast)
    prepare(source, args.out, autoencoder, settings, part=part, num_parts=num_parts, batch_size=args.batch_size,
            workers=args.workers, progress=not args.no_progress)
    if num_parts == 1:
        merge(args.out)


def run_digits(args: argparse.Namespace) -> None:
    from dtr_scale.data_prep.digits import prepare_digits

    manifest = prepare_digits(args.out, format=args.format, progress=not args.no_progress)
    logging.getLogger(__name__).info("digits ready at %s: %d samples", args.out, manifest["num_samples"])


def run_merge(args: argparse.Namespace) -> None:
    from dtr_scale.data_prep.merge import merge

    merge(args.out)


def run_verify(args: argparse.Namespace) -> None:
    try:
        read_manifest(args.out)  # no dataset there is a usage error (2); damage found by the pass a failure (1)
    except ShardDataError as err:
        raise PrepError(str(err)) from err
    from dtr_scale.data_prep.merge import verify  # imports torch: after the check

    bad = verify(args.out)
    if bad:  # damage found by the check: a failure (exit 1), not a usage error
        raise ShardDataError(f"{len(bad)} shard(s) in {args.out} do not match their checksum: {', '.join(bad[:10])}; "
                        "delete their chunk directories, rerun prep for those parts and merge again")
    print(f"{args.out}: all shards match manifest.json")
    if args.add_sample_hashes:
        from dtr_scale.data_prep.merge import add_sample_hashes

        print(f"{args.out}: per-sample hashes added to {add_sample_hashes(args.out)} chunk(s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtr-prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    commands = parser.add_subparsers(dest="command", required=True)

    images = commands.add_parser("images", help="encode an ImageFolder directory or tar into latent shards")
    images.add_argument("src", help="ImageFolder root (ROOT/<class>/<image> or ROOT/<class>.tar) or one .tar of it")
    images.add_argument("out", help="output dataset directory")
    images.add_argument("--autoencoder", default="sd-vae-ft-ema",
                        help="sd-vae-ft-ema (default), sd-vae-ft-mse, pixel, or a save_pretrained directory")
    images.add_argument("--vae-weights", help="local directory holding the named SD VAE (else the HF cache)")
    images.add_argument("--resolution", type=int, default=256, help="center-crop size (256 default; 512)")
    images.add_argument("--format", choices=FORMATS, default="mds")
    images.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    images.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    images.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none")
    images.add_argument("--batch-size", type=int, default=64, help="images per encode call (x2 with flips)")
    images.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    images.add_argument("--shard-size", type=int, default=1024, help="images per chunk, the unit of resume")
    images.add_argument("--classes", help="file with one class folder name per line, fixing the label order")
    images.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    images.add_argument("--part", type=int, help="this part, from 0 (default: SLURM_ARRAY_TASK_ID or 0)")
    images.add_argument("--num-parts", type=int, help="number of parts (default: SLURM_ARRAY_TASK_COUNT or 1)")
    images.set_defaults(run=run_images)

    digits = commands.add_parser("digits", help="prepare the embedded scikit-learn digits (pixel autoencoder)")
    digits.add_argument("out", nargs="?", default="data/digits")
    digits.add_argument("--format", choices=FORMATS, default="mds")
    digits.set_defaults(run=run_digits)

    merge = commands.add_parser("merge", help="join finished parts: index, report and manifest")
    merge.add_argument("out")
    merge.set_defaults(run=run_merge)

    verify = commands.add_parser("verify", help="rehash every shard against manifest.json and renew the verified "
                                                "mark that spares the loaders this pass")
    verify.add_argument("out")
    verify.add_argument("--add-sample-hashes", action="store_true",
                        help="then give a dataset prepared without per-sample hashes its hash files")
    verify.set_defaults(run=run_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    """`dtr-prep` (and `dtr-scale prep`), with the project's exit statuses (command_line): 2 for
    arguments, a source or a dataset state that cannot work, 1 for a failure while working
    (a shard that fails its checksum, a crash), each as one line; --verbose adds the traceback."""
    from dtr_scale.command_line import errors_reported, take_verbose
    from dtr_scale.config import ConfigError

    verbose, argv = take_verbose(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with errors_reported("prep", verbose):
        try:
            args.run(args)
        except Exception as err:
            if is_usage_error(err):
                raise ConfigError(str(err)) from err
            raise


def is_usage_error(err: Exception) -> bool:
    """Arguments, a source or a dataset state that cannot work, found before the work (exit 2)."""
    from dtr_scale.data_prep.sources import SourceError

    # The autoencoders (and torch) load only for `images`; a command that never loaded them raised none of theirs.
    autoencoders = sys.modules.get("dtr_scale.models.autoencoders")
    missing_weights = (autoencoders.MissingWeightsError,) if autoencoders else ()
    return isinstance(err, (PrepError, SourceError, *missing_weights))
