"""Logistic regression by gradient descent on a small CSV, in plain Python.

An ordinary script: it knows nothing of hpsweep. It reads its data by a relative path, imports a
module beside it, takes its options from the command line and prints its progress.

    python train.py --lr 0.5 --epochs 20 --seed 0
"""

import argparse
import math
import random

from features import load_points, standardise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--l2", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data", default="data/points.csv")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    points = standardise(load_points(args.data))
    rng.shuffle(points)
    cut = int(len(points) * 0.8)
    train, test = points[:cut], points[cut:]
    w = [rng.gauss(0, 0.1) for _ in range(len(points[0][0]))]
    b = 0.0

    def predict(x):
        z = sum(wi * xi for wi, xi in zip(w, x, strict=True)) + b
        return 1 / (1 + math.exp(-max(-30.0, min(30.0, z))))

    def loss_of(rows):
        eps = 1e-12
        return -sum(y * math.log(predict(x) + eps) + (1 - y) * math.log(1 - predict(x) + eps)
                    for x, y in rows) / len(rows)

    for epoch in range(1, args.epochs + 1):
        rng.shuffle(train)
        for x, y in train:
            g = predict(x) - y
            w = [wi - args.lr * (g * xi + args.l2 * wi) for wi, xi in zip(w, x, strict=True)]
            b -= args.lr * g
        print(f"epoch {epoch}: loss={loss_of(train):.5f}")
    correct = sum((predict(x) > 0.5) == (y == 1) for x, y in test)
    print(f"Test set: Average loss: {loss_of(test):.4f}, Accuracy: {correct}/{len(test)} "
          f"({100.0 * correct / len(test):.1f}%)")
    with open("model.txt", "w") as f:       # written in the working directory
        f.write(" ".join(f"{v:.6f}" for v in [*w, b]) + "\n")


if __name__ == "__main__":
    main()
