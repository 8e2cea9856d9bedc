"""Command line for Part B on your own machine (on Colab or Kaggle use run_diffusion.ipynb).

    python main.py --train_steps 1000 --save_and_sample_every 100          # Part 1
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid    # Part 2
    python main.py --visualize                                             # Parts 3 and 4
    python main.py --demo          # synthetic images, no download, a few minutes on a CPU

Bad settings or missing files print one line on stderr and exit with status 2.
"""
import argparse
import sys

from utils import run_demo, train_diffusion, visualize_diffusion


def build_parser():
    """Flags and defaults of the handout's tables 1-3."""
    parser = argparse.ArgumentParser(description="Train or visualize a DDPM on AFHQ.")
    parser.add_argument("--train_steps", type=int, default=10000,
                        help="training iterations (Part 1-2: 1000, Part 5: 10000)")
    parser.add_argument("--save_and_sample_every", type=int, default=1000,
                        help="steps between checkpoints, sample grids and FID")
    parser.add_argument("--fid", action="store_true", help="compute FID at every save (Part 2)")
    parser.add_argument("--save_folder", default="./results", help="where outputs go")
    parser.add_argument("--data_path", default="./data/train/",
                        help="folder holding cat/ dog/ wild/ (or the dataset root above it)")
    parser.add_argument("--load_path", default=None,
                        help="checkpoint to resume or visualize "
                             "(default for --visualize: SAVE_FOLDER/model.pt)")
    parser.add_argument("--unet_dim_mults", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="U-Net channel multipliers per resolution")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--data_class", default="cat", choices=["all", "cat", "dog", "wild"])
    parser.add_argument("--time_steps", type=int, default=50, help="diffusion steps T")
    parser.add_argument("--unet_dim", type=int, default=16,
                        help="output channels of the U-Net's first layer")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--dataloader_workers", type=int, default=16,
                        help="decoding threads and clean-fid workers (capped at the CPU count)")
    parser.add_argument("--visualize", action="store_true",
                        help="draw the forward and backward processes of a trained model")
    parser.add_argument("--demo", action="store_true",
                        help="train 300 steps on synthetic images written into SAVE_FOLDER")
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    arguments = vars(build_parser().parse_args(argv))
    demo = arguments.pop("demo")
    visualize = arguments.pop("visualize")
    try:
        if demo:
            run_demo(arguments["save_folder"])
        elif visualize:
            visualize_diffusion(**arguments)
        else:
            train_diffusion(**arguments)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
