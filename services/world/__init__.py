"""The world service: creates SANDBOX worlds, seeds prior memories, schedules rounds of
interactions over the agent and observer services, publishes records, resumes after a crash."""
