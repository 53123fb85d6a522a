"""The run's seeding rule: every random stream is named by the run's seed and its parts, so that a
resumed run, another rank or a loader worker draws the same numbers for the same sample or step."""
import random

import torch

SEED_MIX = 1_000_003


def seeded_rng(*parts):
    """A Python RNG seeded by the parts (sample-level choices: crops, flips, EDA, replacements)."""
    return random.Random(':'.join(map(str, parts)))


def generator(seed, index):
    """A CPU torch generator for stream `index` of a run seeded `seed`: the sampler's pass p, the
    MLM masks of the batch starting at stream position p, the device augmentation of step t and
    rank r (index t * world + r). Distinct indices give distinct streams within one use; the
    uses share the mixing rule, so their index ranges may overlap (they draw unrelated things)."""
    return torch.Generator().manual_seed(seed * SEED_MIX + index)
