"""Figures shared by the notebooks."""
import matplotlib.pyplot as plt
import numpy as np


def show_digits(images: np.ndarray, titles, columns: int = 8):
    """Draw images of shape (n, 28, 28[, 1]) in a grid, each with its title."""
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow(image.reshape(image.shape[0], image.shape[1]), cmap="gray_r")
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure
