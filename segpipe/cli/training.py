"""``segpipe train`` and ``evaluate``: make a model, and score one against ground truth.

Both report a :class:`segpipe.analysis.evaluation.Evaluation`: ``train`` its validation (of the
trained weights, then of the saved ones), ``evaluate`` a result store's or a model's scores.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from segpipe.cli.text import DeprecatedAlias
from segpipe.config import SegmentConfig

__all__ = ["add_evaluate", "add_train"]


def add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tr = sub.add_parser("train", help="train a model on synthetic scenes or a folder of pairs")
    tr.add_argument(
        "output",
        metavar="CHECKPOINT",
        help="checkpoint to write (.pt), a local file; checked before training",
    )
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace CHECKPOINT if it exists (also to fine-tune --model CHECKPOINT in place)",
    )
    tr.add_argument(
        "--model",
        default="unet",
        metavar="MODEL",
        help="architecture to build (unet, fcn, fcn-updown, sliding-window), or a shipped "
        "model or checkpoint to fine-tune",
    )
    tr.add_argument("--architecture", dest="model", action=DeprecatedAlias, new="use --model")
    tr.add_argument(
        "--dataset",
        choices=("tissue", "aerial", "folder"),
        default=None,
        help="synthetic tissue or aerial scenes, or pairs from --train-folder (default: "
        "folder with --train-folder or --val-folder, else tissue)",
    )
    tr.add_argument(
        "--train-folder",
        default=None,
        metavar="DIR",
        help="images/ labels/ [instances/] folder; implies --dataset folder",
    )
    tr.add_argument(
        "--val-folder",
        default=None,
        metavar="DIR",
        help="held-out validation pairs, same layout, dtype and channels",
    )
    tr.add_argument(
        "--steps",
        type=int,
        default=500,
        metavar="N",
        help="optimiser steps in all (over all epochs)",
    )
    tr.add_argument(
        "--epochs",
        type=int,
        default=1,
        metavar="N",
        help="validate and checkpoint N times, every ceil(steps / N) steps",
    )
    tr.add_argument("--batch-size", type=int, default=8, metavar="N", help="patches per step")
    tr.add_argument(
        "--patch", type=int, default=92, metavar="PIXELS", help="label crop side, pixels"
    )
    tr.add_argument("--lr", type=float, default=2e-3, metavar="RATE", help="learning rate")
    tr.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    tr.add_argument(
        "--slide-size",
        type=int,
        default=2048,
        metavar="PIXELS",
        help="synthetic training scene side",
    )
    tr.add_argument(
        "--num-slides", type=int, default=4, metavar="N", help="synthetic training scenes"
    )
    tr.add_argument(
        "--val-size", type=int, default=1024, metavar="PIXELS", help="validation scene side"
    )
    tr.add_argument(
        "--loss-weights",
        choices=("none", "balanced", "unet"),
        default="none",
        help="unet: class balance plus the border term between touching objects",
    )
    tr.add_argument(
        "--w0", type=float, default=10.0, metavar="WEIGHT", help="unet loss: border weight"
    )
    tr.add_argument(
        "--sigma",
        type=float,
        default=5.0,
        dest="sigma_px",
        metavar="PIXELS",
        help="unet loss: border width",
    )
    tr.add_argument(
        "--separate-touching",
        action="store_true",
        help="cut gaps between touching objects in the training labels: each object's pixels "
        "that touch another take the surrounding class (a gap two pixels wide, one of each)",
    )
    tr.add_argument(
        "--elastic-std",
        type=float,
        default=0.0,
        dest="elastic_std_px",
        metavar="PIXELS",
        help="elastic deformation (0 = off)",
    )
    tr.add_argument(
        "--jitter", type=float, default=0.0, metavar="AMOUNT", help="intensity jitter (0 = off)"
    )
    tr.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="a checkpoint per epoch here (a folder of no other run's, or the resumed run's)",
    )
    tr.add_argument(
        "--resume",
        default=None,
        dest="resume_from",
        metavar="CHECKPOINT",
        help="continue from this epoch checkpoint (with the options its run had)",
    )
    tr.add_argument(
        "--width", type=int, default=None, metavar="N", help="channels of the first block"
    )
    tr.add_argument("--depth", type=int, default=None, metavar="N", help="down-sampling steps")
    tr.add_argument(
        "--padding",
        choices=("valid", "same"),
        default=None,
        help="convolution padding (default: the architecture's)",
    )
    tr.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        dest="pixel_size_um",
        metavar="UM",
        help="microns per pixel the model records (default: the one all training images share, "
        "else a fine-tuned checkpoint's)",
    )
    tr.add_argument("--full-precision", action="store_true", help="save float32 weights")
    # The library names TrainConfig's fields (TrainConfig.sigma_px); the shell's user typed
    # the option (--sigma): each field's option, its deprecated aliases left out.
    flags = {
        a.dest: a.option_strings[0]
        for a in tr._actions
        if a.option_strings and not isinstance(a, DeprecatedAlias)
    }
    tr.set_defaults(run=_train, flags=flags)


def add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser("evaluate", help="per-class IoU/Dice and object F1 against ground truth")
    ev.add_argument(
        "prediction", metavar="PREDICTION", help="a result store, or a model (name or checkpoint)"
    )
    ev.add_argument("ground_truth", metavar="TRUTH", help="one-channel label image (class ids)")
    ev.add_argument(
        "--image",
        default=None,
        metavar="IMAGE",
        help="image to segment when PREDICTION is a model (refused with a result)",
    )
    ev.add_argument(
        "--instances", default=None, metavar="IMAGE", help="ground-truth object ids, for object F1"
    )
    ev.add_argument(
        "--object-class",
        default=None,
        metavar="CLASS",
        help="class (name or id) whose objects are scored (needs --instances)",
    )
    ev.add_argument(
        "--iou-threshold",
        type=float,
        default=0.5,
        metavar="IOU",
        help="a predicted object matches a true one at this IoU or above, in (0, 1]",
    )
    ev.add_argument(
        "--min-size",
        type=int,
        default=0,
        dest="min_size_px",
        metavar="PIXELS",
        help="ignore predicted objects smaller than this",
    )
    ev.add_argument(
        "--tile",
        type=int,
        default=SegmentConfig().tile,
        metavar="PIXELS",
        help="output tile side when PREDICTION is a model, as segment's --tile",
    )
    ev.add_argument("--json", action="store_true", help="print JSON instead of text")
    ev.set_defaults(run=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from segpipe.training import check_output

    # Refused now, not after the training: an existing file, a folder, a URL, no write access.
    output = check_output(args.output, overwrite=args.overwrite)
    try:
        return _trained(args, output)
    except ValueError as err:
        text = re.sub(r"TrainConfig\.(\w+)", lambda m: args.flags.get(m[1], m[0]), str(err))
        if text == str(err):
            raise
        raise ValueError(text) from err


def _trained(args: argparse.Namespace, output: Path) -> int:
    from segpipe import training
    from segpipe.analysis.evaluation import Evaluation

    folders = args.train_folder is not None or args.val_folder is not None
    config = training.TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patch=args.patch,
        lr=args.lr,
        seed=args.seed,
        slide_size=args.slide_size,
        num_slides=args.num_slides,
        val_size=args.val_size,
        dataset=args.dataset or ("folder" if folders else "tissue"),
        train_folder=args.train_folder,
        val_folder=args.val_folder,
        loss_weights=args.loss_weights,
        w0=args.w0,
        sigma_px=args.sigma_px,
        separate_touching=args.separate_touching,
        elastic_std_px=args.elastic_std_px,
        jitter=args.jitter,
        checkpoint_dir=args.checkpoint_dir,
        resume_from=args.resume_from,
        pixel_size_um=args.pixel_size_um,
        progress=False,  # the command's own display (segpipe.cli.main) shows the stage
    )
    # fcn-updown calls its down-sampling steps levels; --depth is refused by an architecture
    # without them (fcn), naming its settings.
    depth = "levels" if args.model == "fcn-updown" else "depth"
    options = {"width": args.width, depth: args.depth, "padding": args.padding}
    model = training.initial_model(
        args.model,
        class_names=training.class_names_for(config),
        seed=config.seed,
        contract=training.pixel_contract_for(config),  # the data's channels, dtype, scaling
        **{k: v for k, v in options.items() if v is not None},
    )
    result = training.train(model, config)
    saved = training.save_trained(
        model,
        config,
        result,
        output,
        half=not args.full_precision,
        # Checked before training too, but a file may appear at OUTPUT while it trains.
        overwrite=args.overwrite,
        extra={"command": " ".join(sys.argv)},
    )
    if args.quiet:
        print(f"wrote {args.output}")
        return 0
    # format_report starts with the table `segpipe evaluate` prints (Evaluation.report), of
    # the trained weights; float16 ones score a little differently, so theirs follows.
    print(training.format_report(result))
    if args.full_precision:
        print(f"wrote {args.output} (float32 weights, as validated)")
        return 0
    print(f"wrote {args.output}; validation of the saved float16 weights:")
    print(Evaluation.from_dict(saved).report())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from segpipe.analysis.evaluation import evaluate
    from segpipe.results import is_result

    # --tile has a default, so the library cannot tell it was given; --image it refuses itself.
    if args.tile != SegmentConfig().tile and is_result(args.prediction):
        raise ValueError(
            f"--tile is for a model PREDICTION; {args.prediction} is a result store, already "
            "segmented: drop --tile"
        )
    scores = evaluate(
        args.prediction,
        args.ground_truth,
        image=args.image,
        instances=args.instances,
        object_class=args.object_class,
        iou_threshold=args.iou_threshold,
        min_size_px=args.min_size_px,
        tile=args.tile,
    )
    print(json.dumps(scores.as_dict(), indent=2) if args.json else scores.report())
    return 0
