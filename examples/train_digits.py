"""Train a fused CIFAR ResNet-20 on scikit-learn's handwritten digits, then check that
fused training tracks plain torch.nn from the same weights and data order.

    python examples/train_digits.py [--epochs 10] [--out runs/digits]
"""

import argparse

from fusedres.train import TrainConfig, parity, train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/digits")
    args = p.parse_args()

    cfg = TrainConfig(arch="resnet20", epochs=args.epochs, out=args.out)
    result = train(cfg)
    last = result["history"][-1]
    print(f"test error after {last['epoch']} epochs: {last['test_error']:.2%} ({args.out}/curves.png)")

    parity(TrainConfig(arch="resnet20", batch_size=32), steps=10)


if __name__ == "__main__":
    main()
