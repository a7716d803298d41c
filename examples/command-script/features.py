"""Helpers the script imports from its own directory."""

import csv


def load_points(path):
    """Rows of ``x1,x2,label`` -> ``[([x1, x2], label), ...]``."""
    with open(path, newline="") as f:
        return [([float(v) for v in row[:-1]], int(row[-1])) for row in csv.reader(f) if row]


def standardise(points):
    n = len(points)
    dims = len(points[0][0])
    mean = [sum(x[i] for x, _ in points) / n for i in range(dims)]
    std = [max(1e-9, (sum((x[i] - mean[i]) ** 2 for x, _ in points) / n) ** 0.5) for i in range(dims)]
    return [([(x[i] - mean[i]) / std[i] for i in range(dims)], y) for x, y in points]
