"""The SynthRef expression grammar, its semantics, and the verifier that makes refs unambiguous.

Grammar (one modifier at most; the head may carry a colour)::

    expression := head | size head | head position | head relation landmark
    head       := [colour] noun            landmark := [colour] noun (itself unique)
    size       := bigger/biggest | smaller/smallest            (area, among the head's matches)
    position   := left | right | top | bottom | middle         (among the head's matches)
    relation   := left of | right of | above | below           (box centres vs the landmark's)

Semantics are three-valued so that a ref is clear to a person, not just to arithmetic: every
object is *true*, *false* or *unclear* for an expression (e.g. "left of" is true 10% of the image
width or more to the left and more left than above/below, false at or right of the landmark,
unclear in between). An expression is kept for a target only if the target is the one true
object and no object is unclear (:func:`picks_only`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE_RATIO = 1.5          # "bigger" needs at least this area ratio over every other match
MARGIN_FRACTION = 0.1     # positions and relations need this fraction of the image side

NOUNS = {
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "ellipse": ("ellipse", "oval"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "donut"),
    "star": ("star",),
    "crescent": ("crescent", "moon"),
    "blob": ("blob", "splotch"),
}
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = ("left_of", "right_of", "above", "below")
SIZES = ("big", "small")


@dataclass(frozen=True)
class Facts:
    """What the grammar can see of an object: category, colour, box centre and mask area."""

    category: str
    colour: str
    cx: float
    cy: float
    area: float


@dataclass(frozen=True)
class Head:
    category: str
    colour: str | None = None

    def matches(self, obj: Facts) -> bool:
        return obj.category == self.category and self.colour in (None, obj.colour)


@dataclass(frozen=True)
class Expression:
    """A parsed referring expression (the structure behind one sentence)."""

    head: Head
    size: str | None = None
    position: str | None = None
    relation: str | None = None
    landmark: Head | None = None


@dataclass(frozen=True)
class Denotation:
    true: frozenset[int]
    unclear: frozenset[int]


def denote(expr: Expression, objects: list[Facts], width: int, height: int) -> Denotation:
    """Which objects ``expr`` is true of, and which it is unclear about."""
    cands = [i for i, o in enumerate(objects) if expr.head.matches(o)]
    if expr.size:
        return _by_size(expr.size, cands, objects)
    if expr.position:
        return _by_position(expr.position, cands, objects, width, height)
    if expr.relation:
        return _by_relation(expr, cands, objects, width, height)
    return Denotation(frozenset(cands), frozenset())


def picks_only(expr: Expression, target: int, objects: list[Facts], width: int,
               height: int) -> bool:
    """True if ``expr`` clearly picks ``target`` and nothing else."""
    result = denote(expr, objects, width, height)
    return result.true == {target} and not result.unclear


def _unclear(cands) -> Denotation:
    return Denotation(frozenset(), frozenset(cands) or frozenset({-1}))


def _by_size(size: str, cands: list[int], objects: list[Facts]) -> Denotation:
    if len(cands) < 2:
        return _unclear(cands)
    sign = 1.0 if size == "big" else -1.0
    ranked = sorted(cands, key=lambda i: -sign * objects[i].area)
    best, runner_up = objects[ranked[0]].area, objects[ranked[1]].area
    clear = best >= SIZE_RATIO * runner_up if size == "big" else runner_up >= SIZE_RATIO * best
    return Denotation(frozenset({ranked[0]}), frozenset()) if clear else _unclear(cands)


def _by_position(position: str, cands: list[int], objects: list[Facts], width: int,
                 height: int) -> Denotation:
    if not cands:
        return Denotation(frozenset(), frozenset())
    if len(cands) == 1:  # a lone match must actually be in that part of the image
        o = objects[cands[0]]
        inside = {
            "left": o.cx < width / 3, "right": o.cx > 2 * width / 3,
            "top": o.cy < height / 3, "bottom": o.cy > 2 * height / 3,
            "middle": abs(o.cx - width / 2) < width / 6 and abs(o.cy - height / 2) < height / 6,
        }[position]
        return Denotation(frozenset(cands), frozenset()) if inside else _unclear(cands)
    if position == "middle":
        if len(cands) != 3:
            return _unclear(cands)
        ranked = sorted(cands, key=lambda i: objects[i].cx)
        xs = [objects[i].cx for i in ranked]
        if min(xs[1] - xs[0], xs[2] - xs[1]) < MARGIN_FRACTION * width:
            return _unclear(cands)
        return Denotation(frozenset({ranked[1]}), frozenset())
    horizontal = position in ("left", "right")
    coord = [(objects[i].cx if horizontal else objects[i].cy) for i in cands]
    order = np.argsort(coord if position in ("left", "top") else [-c for c in coord])
    first, second = coord[order[0]], coord[order[1]]
    if abs(second - first) < MARGIN_FRACTION * (width if horizontal else height):
        return _unclear(cands)
    return Denotation(frozenset({cands[order[0]]}), frozenset())


def _by_relation(expr: Expression, cands: list[int], objects: list[Facts], width: int,
                 height: int) -> Denotation:
    landmarks = [i for i, o in enumerate(objects) if expr.landmark.matches(o)]
    if len(landmarks) != 1:
        return _unclear(cands)
    lm = objects[landmarks[0]]
    true, unclear = set(), set()
    for i in cands:
        if i == landmarks[0]:
            continue
        o = objects[i]
        ahead, across, margin = {
            "left_of": (lm.cx - o.cx, lm.cy - o.cy, width),
            "right_of": (o.cx - lm.cx, lm.cy - o.cy, width),
            "above": (lm.cy - o.cy, lm.cx - o.cx, height),
            "below": (o.cy - lm.cy, lm.cx - o.cx, height),
        }[expr.relation]
        if ahead >= MARGIN_FRACTION * margin and ahead >= abs(across):
            true.add(i)
        elif ahead > 0:
            unclear.add(i)
    return Denotation(frozenset(true), frozenset(unclear))


def unique_head(obj: int, objects: list[Facts]) -> Head | None:
    """The shortest head that picks ``obj`` alone (for landmarks), or None."""
    for head in (Head(objects[obj].category), Head(objects[obj].category, objects[obj].colour)):
        if sum(head.matches(o) for o in objects) == 1:
            return head
    return None


def valid_expressions(target: int, objects: list[Facts], width: int,
                      height: int) -> list[Expression]:
    """Every expression of the grammar that clearly picks ``target`` alone (fixed order)."""
    me = objects[target]
    found = []
    for head in (Head(me.category), Head(me.category, me.colour)):
        options = [Expression(head)]
        options += [Expression(head, size=s) for s in SIZES]
        options += [Expression(head, position=p) for p in POSITIONS]
        for other in range(len(objects)):
            landmark = unique_head(other, objects) if other != target else None
            if landmark is not None:
                options += [Expression(head, relation=r, landmark=landmark) for r in RELATIONS]
        found += [e for e in options if picks_only(e, target, objects, width, height)]
    return found


# ------------------------------------------------------------------------------------ wording

_SIZE_WORDS = {  # (two matches, three or more)
    "big": (("bigger", "larger", "big"), ("biggest", "largest")),
    "small": (("smaller", "small", "little"), ("smallest",)),
}
_POSITION_TEMPLATES = {
    "left": ("the {np} on the left", "left {np}", "the leftmost {np}", "{np} on left"),
    "right": ("the {np} on the right", "right {np}", "the rightmost {np}", "{np} on right"),
    "top": ("the {np} at the top", "top {np}", "the upper {np}", "the topmost {np}"),
    "bottom": ("the {np} at the bottom", "bottom {np}", "the lower {np}", "the bottommost {np}"),
    "middle": ("the {np} in the middle", "middle {np}", "the {np} in the center"),
}
_RELATION_TEMPLATES = {
    "left_of": ("the {np} left of the {lm}", "{np} to the left of the {lm}",
                "the {np} on the left of the {lm}"),
    "right_of": ("the {np} right of the {lm}", "{np} to the right of the {lm}",
                 "the {np} on the right of the {lm}"),
    "above": ("the {np} above the {lm}", "{np} over the {lm}"),
    "below": ("the {np} below the {lm}", "{np} under the {lm}", "the {np} beneath the {lm}"),
}


def _phrase(head: Head, rng: np.random.Generator) -> str:
    noun = str(rng.choice(NOUNS[head.category]))
    return f"{head.colour} {noun}" if head.colour else noun


def render_sentence(expr: Expression, objects: list[Facts], rng: np.random.Generator) -> str:
    """One wording of ``expr`` (lower case, no punctuation, like refer's ``sent``)."""
    np_text = _phrase(expr.head, rng)
    if expr.size:
        matches = sum(expr.head.matches(o) for o in objects)
        words = _SIZE_WORDS[expr.size][0 if matches == 2 else 1]
        template = str(rng.choice(("the {size} {np}", "{size} {np}")))
        return template.format(size=str(rng.choice(words)), np=np_text)
    if expr.position:
        return str(rng.choice(_POSITION_TEMPLATES[expr.position])).format(np=np_text)
    if expr.relation:
        template = str(rng.choice(_RELATION_TEMPLATES[expr.relation]))
        return template.format(np=np_text, lm=_phrase(expr.landmark, rng))
    return str(rng.choice(("the {np}", "{np}"))).format(np=np_text)
