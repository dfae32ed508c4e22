"""Tuned merges: choose λ, β, density, drop and per-input weights on validation data.

- options     what a tuning request may ask for, checked without torch (`TuneRequest`)
- search      coarse-to-fine coordinate search over named parameters (also the bench's)
- candidates  one merge's reusable parts (core space, subspaces, coordinates) and the
              candidate merges built from them
- patch       a base model with low-rank deltas added by forward hooks (no m×n weights)
- evaluation  validation NLL and token accuracy of base + candidate
- weights     learned per-input weights by gradient descent through the coordinates
- api         `tune_merge`: search, learn, then write the best with the merge engine
- cli         `lorafold merge --tune-data ...` options and run
"""

from lorafold.tune.options import TUNE_PARAMS, TuneRequest, check_tune_request

__all__ = ["TUNE_PARAMS", "TuneRequest", "check_tune_request"]
