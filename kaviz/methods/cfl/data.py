"""CFL notebook data: embedded shapes + digits, or CUB-200 + Stanford Dogs."""
from __future__ import annotations


class PairData(tuple):
    """``(sources, train, val, test)``: ``sources`` = ``{name: Splits}`` per dataset, and the union
    of the datasets (comprehensive label space, SPEC §0.1) per split."""

    __slots__ = ()

    def __new__(cls, sources, train, val, test):
        return super().__new__(cls, (sources, train, val, test))

    sources = property(lambda self: self[0])
    train = property(lambda self: self[1])
    val = property(lambda self: self[2])
    test = property(lambda self: self[3])


def load_data(kind: str = "embedded", *, cub_root=None, dogs_root=None, image_size: int = 32,
              n_shapes: int = 2000, val: float = 0.15, test: float = 0.15, seed: int = 0,
              max_per_split: int | None = None) -> PairData:
    """Two datasets with disjoint label sets, split per dataset and united per split.

    ``"embedded"``: synthetic shapes (``n_shapes`` images) and scikit-learn's digits, both
    ``image_size``² RGB, each split train/val/test with :func:`kaviz.data.split`.
    ``"cub_dogs"``: CUB-200-2011 (``cub_root``) and Stanford Dogs (``dogs_root``) via
    :mod:`kaviz.data.real`; their official test splits are the test splits, and ``val`` of each
    training split (without augmentation) is held out for model selection. ``max_per_split``
    (real data): at most that many images of each dataset's train, val and test split, class-balanced
    and seeded (:func:`kaviz.data.limit`); ``None`` keeps everything.
    """
    from ...data import digits, shapes, split, union

    if kind == "embedded":
        sources = {"shapes": split(shapes(n=n_shapes, seed=seed, size=image_size), val=val, test=test, seed=seed),
                   "digits": split(digits(size=image_size, seed=seed), val=val, test=test, seed=seed)}
    elif kind == "cub_dogs":
        from ...data import Splits, limit, real

        sources = {}
        for name, loader, root in (("cub", real.cub200, cub_root), ("dogs", real.stanford_dogs, dogs_root)):
            aug = loader(root, "train", image_size=image_size)
            plain = loader(root, "train", image_size=image_size, augment=False)
            # same seed and targets: the same indices go to val in both copies
            tr, _, _ = split(aug, val=val, test=0.0, seed=seed)
            _, va, _ = split(plain, val=val, test=0.0, seed=seed)
            te = loader(root, "test", image_size=image_size)
            sources[name] = Splits(*(limit(part, max_per_split, seed=seed) for part in (tr, va, te)))
    else:
        raise ValueError(f"unknown data kind {kind!r}; use 'embedded' (shapes + digits) or 'cub_dogs' "
                         "(CUB-200-2011 + Stanford Dogs, with cub_root=... and dogs_root=...)")
    names = list(sources)
    parts = [union([sources[n][k] for n in names], names=names) for k in range(3)]
    return PairData(sources, *parts)
