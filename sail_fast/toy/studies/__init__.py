"""Research drivers over the toy world: the experiment, calibration, sampler transfer and reward audit."""
