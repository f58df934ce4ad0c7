"""Run machinery: the config, a run folder's layout and safety rules, seeding, ranks, interrupts."""
