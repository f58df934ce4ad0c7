"""The SAIL loop: ``loop`` sequences the stages; a round generates and ranks candidates (``ranking``),
pairs best against worst (``pairing``), adds RealAlign's pairs (``realalign``), trains and evaluates."""
