"""Synthetic identities: a person is a combination of appearance attributes.

No single attribute identifies anyone: colours come from a shared palette (with near-duplicate
pairs such as black / charcoal), so many identities wear the same upper-body colour and differ in
trousers, pattern, bag, hat, hair or build. Every pair of identities in one generated table
differs by at least ``MIN_IDENTITY_DISTANCE`` (a weighted count of differing attributes), at least
``MIN_CLOTHING_DISTANCE`` of it in clothing and accessories, so the task is hard but fair: two
identities are never drawn as the same person, nor as twins in the same outfit.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import numpy as np

# Clothing colours (RGB). Several pairs are close on purpose (black / charcoal, navy / black,
# beige / khaki, red / maroon): under a camera's colour cast they are hard to tell apart.
CLOTH_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (24, 24, 28),
    "charcoal": (62, 62, 68),
    "gray": (128, 128, 130),
    "light_gray": (188, 188, 190),
    "white": (236, 236, 232),
    "navy": (30, 40, 92),
    "blue": (42, 84, 182),
    "sky": (122, 170, 222),
    "red": (190, 32, 38),
    "maroon": (112, 26, 38),
    "pink": (230, 142, 172),
    "orange": (234, 122, 32),
    "yellow": (230, 202, 52),
    "olive": (110, 110, 42),
    "green": (40, 132, 62),
    "teal": (30, 130, 132),
    "purple": (112, 52, 142),
    "brown": (110, 70, 40),
    "beige": (206, 186, 146),
    "khaki": (166, 150, 100),
}
COLOR_NAMES: tuple[str, ...] = tuple(CLOTH_COLORS)
COLOR_RGB = np.array([CLOTH_COLORS[name] for name in COLOR_NAMES], dtype=np.float32)  # (C, 3)

# Trousers and skirts are mostly dark, blue or neutral, as in street scenes.
_LOWER_WEIGHTS = {
    "black": 5, "charcoal": 3, "gray": 3, "navy": 4, "blue": 4, "sky": 1, "brown": 2,
    "beige": 2, "khaki": 3, "white": 1, "light_gray": 1, "olive": 1, "maroon": 1, "red": 0.5,
    "green": 0.5, "purple": 0.3, "pink": 0.3, "teal": 0.3, "orange": 0.2, "yellow": 0.2,
}  # fmt: skip
_SHOE_COLORS = ("black", "white", "brown", "gray", "navy", "red")

SKIN_TONES = np.array(
    [(252, 220, 188), (232, 188, 150), (198, 148, 108), (150, 102, 70), (96, 66, 46)],
    dtype=np.float32,
)
HAIR_COLORS = np.array(
    [(24, 20, 18), (68, 44, 30), (122, 82, 46), (214, 180, 112), (162, 160, 158), (148, 62, 30)],
    dtype=np.float32,
)

UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "checks")
SLEEVES = ("long", "short")
LOWER_STYLES = ("trousers", "shorts", "skirt")
HAIR_STYLES = ("short", "long")
BAGS = ("none", "backpack", "shoulder", "handbag")
NO_HAT = -1

MIN_IDENTITY_DISTANCE = 3.0
MIN_CLOTHING_DISTANCE = 1.5
MIN_SHARED_UPPER_FRACTION = 0.2


def _near_color_pairs(threshold: float = 80.0) -> np.ndarray:
    """(C, C) bool: colours close enough to be confused under a camera's colour cast."""
    diff = COLOR_RGB[:, None, :] - COLOR_RGB[None, :, :]
    near = np.linalg.norm(diff, axis=-1) < threshold
    np.fill_diagonal(near, False)
    return near


NEAR_COLORS = _near_color_pairs()


@dataclass(frozen=True)
class Identity:
    """The appearance of one person; colours are indices into ``COLOR_NAMES``.

    ``height`` and ``width`` are the build relative to an average person (1.0).
    ``hat`` is a colour index or ``NO_HAT``.
    """

    upper_color: int
    upper_pattern: str
    upper_color2: int
    sleeves: str
    lower_color: int
    lower_style: str
    shoe_color: int
    skin: int
    hair_color: int
    hair_style: str
    hat: int
    bag: str
    bag_color: int
    height: float
    width: float

    def describe(self) -> str:
        """A short human-readable description, e.g. 'red checks top, navy trousers, backpack'."""
        upper = COLOR_NAMES[self.upper_color]
        if self.upper_pattern != "solid":
            upper += f"/{COLOR_NAMES[self.upper_color2]} {self.upper_pattern}"
        parts = [f"{upper} top", f"{COLOR_NAMES[self.lower_color]} {self.lower_style}"]
        if self.hat != NO_HAT:
            parts.append(f"{COLOR_NAMES[self.hat]} hat")
        if self.bag != "none":
            parts.append(f"{COLOR_NAMES[self.bag_color]} {self.bag}")
        return ", ".join(parts)


# Columns of the attribute code table (see ``attribute_codes``).
(_UPPER, _PATTERN, _UPPER2, _SLEEVES, _LOWER, _STYLE, _SHOES, _SKIN, _HAIR, _HAIR_STYLE, _HAT,
 _BAG, _BAG_COLOR, _HEIGHT, _WIDTH) = range(15)  # fmt: skip


def attribute_codes(identities: list[Identity] | tuple[Identity, ...]) -> np.ndarray:
    """(n, 15) float64: each identity's attributes as numbers (category indices, then build)."""
    rows = [
        (i.upper_color, UPPER_PATTERNS.index(i.upper_pattern), i.upper_color2,
         SLEEVES.index(i.sleeves), i.lower_color, LOWER_STYLES.index(i.lower_style), i.shoe_color,
         i.skin, i.hair_color, HAIR_STYLES.index(i.hair_style), i.hat, BAGS.index(i.bag),
         i.bag_color, i.height, i.width)
        for i in identities
    ]  # fmt: skip
    return np.array(rows, dtype=np.float64).reshape(-1, 15)


def _distance_parts(identity: Identity, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How differently ``identity`` looks from each row of ``others`` (attribute codes), as
    (clothing and accessories, body details): two (n,) float64 arrays.

    Weighted counts of differing attributes: large regions (upper and lower clothing colour)
    weigh most, small details (shoes, skin, hair) least, near colours count half, build
    differences count continuously.
    """
    a = attribute_codes([identity])[0]

    def differs(column: int, weight: float) -> np.ndarray:
        return weight * (others[:, column] != a[column])

    def color_differs(column: int, weight: float) -> np.ndarray:
        mine, theirs = int(a[column]), np.maximum(others[:, column].astype(np.int64), 0)
        near = NEAR_COLORS[max(mine, 0), theirs]
        return np.where(others[:, column] == a[column], 0.0, np.where(near, weight / 2, weight))

    solid = UPPER_PATTERNS.index("solid")
    both_patterned = (a[_PATTERN] != solid) & (others[:, _PATTERN] != solid)
    same_bag = (others[:, _BAG] == a[_BAG]) & (a[_BAG] != BAGS.index("none"))
    both_hats = (a[_HAT] != NO_HAT) & (others[:, _HAT] != NO_HAT)
    clothing = color_differs(_UPPER, 2.0) + color_differs(_LOWER, 1.5) + differs(_PATTERN, 1.0)
    clothing += both_patterned * color_differs(_UPPER2, 0.5)
    clothing += differs(_SLEEVES, 0.5) + differs(_STYLE, 1.0) + differs(_BAG, 1.0)
    clothing += same_bag * color_differs(_BAG_COLOR, 0.5)
    clothing += 1.0 * ((a[_HAT] == NO_HAT) != (others[:, _HAT] == NO_HAT))
    clothing += both_hats * color_differs(_HAT, 0.5)
    details = differs(_HAIR, 0.5) + differs(_HAIR_STYLE, 0.5) + differs(_SKIN, 0.5)
    details += differs(_SHOES, 0.25)
    details += 0.5 * np.minimum(np.abs(others[:, _HEIGHT] - a[_HEIGHT]) / 0.1, 1.0)
    details += 0.5 * np.minimum(np.abs(others[:, _WIDTH] - a[_WIDTH]) / 0.15, 1.0)
    return clothing, details


def identity_distance(a: Identity, b: Identity) -> float:
    """How differently two identities look: a weighted count of differing attributes.

    Shirt colour counts 2, trouser colour 1.5, pattern, lower style, bag type and wearing a hat
    1 each, sleeves, hair, skin and a pattern's, bag's or hat's colour 0.5, shoes 0.25, build up
    to 0.5 each for height and width; near colours count half.
    """
    clothing, details = _distance_parts(a, attribute_codes([b]))
    return float(clothing[0] + details[0])


def clothing_distance(a: Identity, b: Identity) -> float:
    """The part of :func:`identity_distance` due to clothing and accessories alone."""
    return float(_distance_parts(a, attribute_codes([b]))[0][0])


def _far_enough(candidate: Identity, others: np.ndarray, min_distance: float) -> bool:
    """At least ``min_distance`` from every row of ``others``, and dressed differently enough
    (``MIN_CLOTHING_DISTANCE``) that no two identities are twins in the same outfit."""
    clothing, details = _distance_parts(candidate, others)
    return bool(
        np.all(clothing >= MIN_CLOTHING_DISTANCE) and np.all(clothing + details >= min_distance)
    )


def _choice(rng: np.random.Generator, options: tuple[str, ...], p: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=p))]


def _weighted_color(rng: np.random.Generator, weights: dict[str, float]) -> int:
    w = np.array([weights.get(name, 0.0) for name in COLOR_NAMES])
    return int(rng.choice(len(COLOR_NAMES), p=w / w.sum()))


def random_identity(rng: np.random.Generator) -> Identity:
    """One identity with street-like attribute frequencies (no distinctness guarantee)."""
    upper = int(rng.integers(len(COLOR_NAMES)))
    second = int(
        rng.choice([c for c in range(len(COLOR_NAMES)) if c != upper and not NEAR_COLORS[upper, c]])
    )
    hat = int(rng.integers(len(COLOR_NAMES))) if rng.random() < 0.2 else NO_HAT
    return Identity(
        upper_color=upper,
        upper_pattern=_choice(rng, UPPER_PATTERNS, (0.55, 0.17, 0.1, 0.18)),
        upper_color2=second,
        sleeves=_choice(rng, SLEEVES, (0.65, 0.35)),
        lower_color=_weighted_color(rng, _LOWER_WEIGHTS),
        lower_style=_choice(rng, LOWER_STYLES, (0.7, 0.15, 0.15)),
        shoe_color=COLOR_NAMES.index(_SHOE_COLORS[int(rng.integers(len(_SHOE_COLORS)))]),
        skin=int(rng.integers(len(SKIN_TONES))),
        hair_color=int(rng.integers(len(HAIR_COLORS))),
        hair_style=_choice(rng, HAIR_STYLES, (0.65, 0.35)),
        hat=hat,
        bag=_choice(rng, BAGS, (0.45, 0.2, 0.2, 0.15)),
        bag_color=int(rng.integers(len(COLOR_NAMES))),
        height=float(rng.uniform(0.9, 1.1)),
        width=float(rng.uniform(0.85, 1.2)),
    )


def shared_upper_fraction(identities: list[Identity]) -> float:
    """Fraction of identities whose upper-body colour is also worn by another identity."""
    if not identities:
        return 0.0
    counts = Counter(identity.upper_color for identity in identities)
    return sum(counts[identity.upper_color] > 1 for identity in identities) / len(identities)


def sample_identities(
    rng: np.random.Generator,
    count: int,
    avoid: list[Identity] | tuple[Identity, ...] = (),
    min_distance: float = MIN_IDENTITY_DISTANCE,
) -> list[Identity]:
    """``count`` identities, pairwise (and from ``avoid``) at least ``min_distance`` apart.

    At least ``MIN_SHARED_UPPER_FRACTION`` of the returned identities share their upper-body
    colour with another one of them (for tables of two or more), so that a model cannot
    identify people by their shirt alone.
    """
    if count < 0:
        raise ValueError(f"identity count must be >= 0, got {count}")
    codes = np.zeros((len(avoid) + count, 15))
    codes[: len(avoid)] = attribute_codes(avoid)
    chosen: list[Identity] = []
    for _ in range(count):
        taken = codes[: len(avoid) + len(chosen)]
        identity = _sample_distinct(rng, taken, min_distance, upper_color=None)
        codes[len(avoid) + len(chosen)] = attribute_codes([identity])[0]
        chosen.append(identity)
    _share_upper_colors(rng, chosen, codes, len(avoid), min_distance)
    return chosen


def _sample_distinct(
    rng: np.random.Generator,
    others: np.ndarray,
    min_distance: float,
    upper_color: int | None,
    attempts: int = 1000,
) -> Identity:
    """A random identity (with ``upper_color`` if given) far enough from every row of
    ``others``."""
    for _ in range(attempts):
        candidate = random_identity(rng)
        if upper_color is not None:
            candidate = _with_upper_color(candidate, upper_color)
        if _far_enough(candidate, others, min_distance):
            return candidate
    raise ValueError(
        f"could not sample an identity at distance >= {min_distance} from {len(others)} others; "
        "ask for fewer identities"
    )


def _with_upper_color(identity: Identity, color: int) -> Identity:
    second = identity.upper_color2
    if second == color or NEAR_COLORS[second, color]:
        second = next(
            c for c in range(len(COLOR_NAMES)) if c != color and not NEAR_COLORS[c, color]
        )
    return dataclasses.replace(identity, upper_color=color, upper_color2=second)


def _share_upper_colors(
    rng: np.random.Generator,
    chosen: list[Identity],
    codes: np.ndarray,
    offset: int,
    min_distance: float,
) -> None:
    """Re-draw identities with a unique upper colour, copying another's, until enough share.

    ``codes`` holds the attribute codes of the avoided identities, then of ``chosen`` from row
    ``offset``; both are updated in place.
    """
    if len(chosen) < 2:
        return
    while shared_upper_fraction(chosen) < MIN_SHARED_UPPER_FRACTION:
        counts = Counter(identity.upper_color for identity in chosen)
        lonely = [i for i, identity in enumerate(chosen) if counts[identity.upper_color] == 1]
        index = lonely[int(rng.integers(len(lonely)))]
        donor = chosen[(index + 1 + int(rng.integers(len(chosen) - 1))) % len(chosen)]
        others = np.delete(codes, offset + index, axis=0)
        chosen[index] = _sample_distinct(rng, others, min_distance, donor.upper_color)
        codes[offset + index] = attribute_codes([chosen[index]])[0]
