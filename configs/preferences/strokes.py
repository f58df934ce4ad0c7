"""Two toy humans that differ from the built-in one only in the stroke width they like (legibility,
haze and centring as before), for `toy.preference`:

- ``bold``: prefers strokes one standard deviation bolder than the built-in human's (the 75th percentile
  of real digits' widths), so a reward that favours thin strokes works against it;
- ``thin``: prefers strokes two standard deviations thinner (about the 10th percentile), so that bias
  works for it.

    sail-fast run --set toy.preference=configs/preferences/strokes.py:bold --set toy.temperature=auto
"""

from sail_fast.toy.human import stroke_preference

bold = stroke_preference(+1.0)
thin = stroke_preference(-2.0)
