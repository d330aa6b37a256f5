"""SANDBOX data: interaction records and their reader, world ids and states, agent memory, HH-RLHF data,
ratings read out of model text, seeding and the statistics of reports."""
