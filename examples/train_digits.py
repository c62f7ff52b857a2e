"""Train a fused CIFAR ResNet-20 on scikit-learn's handwritten digits, then check that
fused training tracks plain torch.nn from the same weights and data order.

    python examples/train_digits.py                 # short run: 2 epochs + 5 parity steps
    python examples/train_digits.py --full          # 10 epochs + 10 parity steps
    python examples/train_digits.py --epochs 4 --out runs/digits

Run times measured on 2 CPU cores (a 2-thread Xeon shared with other jobs, float32, the
fused ``cpu`` backend; an epoch is 12 steps of batch 128 and took 5 to 45 s there): the
short run 1.5 minutes, ``--full`` 4.5 to 9 minutes. The short run is a demonstration, not
a trained model: the learning rate is cut at 50% and 75% of the epochs, so 2 epochs end
near 70% test error; ``--full`` reaches about 1%. Writes ``history.csv``, ``curves.png``,
``checkpoint.pt`` and ``state_dict.pt`` to ``--out``; the parity check prints a line per
step and ends with ``PASS`` or ``FAIL`` and the drifts against their bounds.
"""

import argparse

from fusedres.train import ParityError, TrainConfig, parity, train

SHORT = {"epochs": 2, "parity_steps": 5}
FULL = {"epochs": 10, "parity_steps": 10}


def main():
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--full", action="store_true",
                   help=f"{FULL['epochs']} epochs and {FULL['parity_steps']} parity steps (4.5 to 9 minutes on 2 "
                        f"CPU cores) instead of {SHORT['epochs']} and {SHORT['parity_steps']} (1.5 minutes)")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    p.add_argument("--out", default="runs/digits")
    args = p.parse_args()
    run = FULL if args.full else SHORT
    epochs = args.epochs if args.epochs is not None else run["epochs"]
    if epochs < 1:
        p.error(f"argument --epochs: expected an integer >= 1, got {epochs}")

    cfg = TrainConfig(arch="resnet20", epochs=epochs, out=args.out)
    result = train(cfg)
    last = result["history"][-1]
    print(f"test error after {last['epoch']} epochs: {last['test_error']:.2%} ({args.out}/curves.png)")

    try:
        parity(TrainConfig(arch="resnet20", batch_size=32), steps=run["parity_steps"])
    except ParityError:
        raise SystemExit(1) from None  # parity() has printed the FAIL line with the figures


if __name__ == "__main__":
    main()
