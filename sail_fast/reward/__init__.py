"""The implicit DPO reward: the drop-in scorer and its estimators."""
