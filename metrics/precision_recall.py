"""Improved precision and recall: how much of the generated set lies on the real manifold, and how much of
the real manifold the generated set covers.

Kynkaanniemi, Karras, Laine, Lehtinen & Aila 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", arXiv 1904.06991, Sec. 2: each set's manifold is the union of balls around its feature
vectors, each ball reaching the k-th nearest other vector of the same set (k = 3);

    f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for at least one phi' in Phi, else 0   (Eq. 1)
    precision(Phi_r, Phi_g) = 1/|Phi_g| sum_{phi_g} f(phi_g, Phi_r)                                       (Eq. 2)
    recall(Phi_r, Phi_g)    = 1/|Phi_r| sum_{phi_r} f(phi_r, Phi_g)

Their code and torch-fidelity's both take the (k+1)-th smallest distance from a vector to its own set (the
first is the vector itself, at 0) and compare with <=; so does this. Distances in float64 (torch-fidelity:
float32), a block of rows at a time so that memory stays O(block x N).

Notation: Phi_g generated (N_g, D), Phi_r real (N_r, D).
"""
import torch

BLOCK = 1024  # rows of the distance matrix held at once


def knn_radii(features, k=3):
    """||phi' - NN_k(phi', Phi)|| for every phi' of Phi (N, D) -> (N,): the (k+1)-th smallest distance
    within the set, the first being the vector itself."""
    N = features.shape[0]
    if N <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images per set, got {N}")
    radii = [torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(BLOCK)]
    return torch.cat(radii)                                                       # (N,)


def inside_manifold(queries, support, radii):
    """f(phi, Phi) of Eq. 1 for every query (M, D) against the balls of support (N, D) with radii (N,) -> (M,) bool."""
    inside = [(torch.cdist(block, support) <= radii).any(dim=1) for block in queries.split(BLOCK)]
    return torch.cat(inside)


def precision_recall(generated, real, k=3):
    """(precision, recall) of generated features (N_g, D) against real ones (N_r, D)."""
    generated = torch.as_tensor(generated).to(torch.float64)
    real = torch.as_tensor(real).to(torch.float64)
    if generated.shape[1] != real.shape[1]:
        raise ValueError(f"precision/recall between features of dimension {generated.shape[1]} and {real.shape[1]}")
    precision = inside_manifold(generated, real, knn_radii(real, k)).double().mean().item()   # Eq. 2
    recall = inside_manifold(real, generated, knn_radii(generated, k)).double().mean().item()
    return precision, recall
