"""Inception Score: are the images confidently classified, and are the classes diverse?

Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv 1606.03498, Sec. 4:

    IS = exp( E_x KL( p(y|x) || p(y) ) ),    p(y) = E_x p(y|x)                          (Salimans Sec. 4)

with p(y|x) the softmax of Inception's 1008 logits. As in their code (and torch-fidelity's
"logits_unbiased"), the logits are pool3 @ W^T without the fc bias (metrics/inception.py: InceptionV3.logits),
the N images are cut into 10 splits, p(y) is the mean over one split, and the score is the mean and
standard deviation over the splits. IS ranges from 1 (every image gets the same class distribution) to the
number of classes (each image certain of its class, all classes equally often).

`shuffle_seed`: the original code splits the images in the order given; torch-fidelity first permutes
them with numpy's RandomState(2020).permutation, which this reproduces for the same seed. The images of a
generator are exchangeable, so only the split boundaries change.
"""
import numpy as np
import torch


def inception_score(logits, splits=10, shuffle_seed=None):
    """logits (N, K) -> (mean, std) of exp(mean_x KL(p(y|x) || p(y))) over `splits` consecutive parts."""
    logits = torch.as_tensor(logits).to(torch.float64)
    N, K = logits.shape
    if N < splits:
        raise ValueError(f"the Inception Score of {N} images in {splits} splits: need at least {splits} images")
    if shuffle_seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(N))]
    log_p = logits.log_softmax(dim=1)                                             # log p(y|x) (N, K)
    scores = []
    for i in range(splits):
        part = log_p[i * N // splits: (i + 1) * N // splits]                      # (n, K)
        log_py = part.exp().mean(dim=0).log()                                     # log p(y) over the split (K,)
        kl = (part.exp() * (part - log_py)).sum(dim=1)                            # KL(p(y|x) || p(y)) (n,)
        scores.append(kl.mean().exp().item())                                     # Salimans Sec. 4
    return float(np.mean(scores)), float(np.std(scores))
