"""The recipe's shared pieces, as the original's utils.py held them: seeding (every random draw of an epoch comes
from (seed, epoch), never from what ran before: a checkpoint needs no RNG state), each epoch's sample order, the
class-balanced weights and the label-smoothing loss."""
import random

import numpy as np
import torch


def derive_seed(*parts):
    """Mix integers into one 63-bit seed (SplitMix64 steps), so nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def epoch_order(size, seed, epoch, world_size=1, rank=0):
    """This rank's [(index, seed)] of an epoch, shuffled as DistributedSampler shuffles (seed + epoch); each
    image's own seed fixes its crop and flip whatever the worker count, the process that loads it, or the cache."""
    sampler = torch.utils.data.DistributedSampler(range(size), num_replicas=world_size, rank=rank, seed=seed)
    sampler.set_epoch(epoch)
    return [(index, derive_seed(seed, epoch, index)) for index in sampler]


def class_balanced_weights(targets, num_classes):
    """Per-class weights w_c ∝ N / n_c summing to `num_classes` -> float [num_classes]: every class
    weighs about equally in the loss; a class with no sample gets 0 (it is never a target)."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    counts = torch.bincount(targets, minlength=num_classes)[:num_classes].double()
    weights = torch.where(counts > 0, targets.numel() / counts.clamp(min=1), torch.zeros_like(counts))
    return (weights * num_classes / weights.sum()).float()


class LabelSmoothingCrossEntropy(torch.nn.Module):
    """Cross-entropy of logits / temperature against a smoothed target ((1 - smoothing) on the true
    class, smoothing spread over all); each sample's loss times its class `weight`, then the batch mean."""

    def __init__(self, smoothing=0.1, temperature=1.0, weight=None):
        super().__init__()
        self.smoothing, self.temperature = smoothing, temperature
        self.register_buffer('weight', None if weight is None else torch.as_tensor(weight, dtype=torch.float))

    def forward(self, logits, target):
        # logits [B, C] (any float dtype; computed in float32), target [B] class indices
        log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)  # [B]
        uniform = -log_probs.mean(dim=-1)  # [B]: cross-entropy with the uniform distribution
        loss = (1.0 - self.smoothing) * nll + self.smoothing * uniform
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()
